"""Dispatch: resolved once per op, CAI_KERNELS override, in-process override, no triton."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]


def _run(code, **env):
    full_env = {**os.environ, **env}
    full_env.pop("CAI_KERNELS", None) if "CAI_KERNELS" not in env else None
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc


def test_default_is_torch_without_cuda():
    proc = _run("import kernels; print({kernels.backend(op) for op in kernels.OPS})")
    assert proc.returncode == 0, proc.stderr
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert proc.stdout.strip() == repr({expected})


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_env_override(impl):
    code = ("import torch, kernels; print(sorted({kernels.backend(op) for op in kernels.OPS}));"
            "x = torch.randn(3, 40); print(kernels.logprob(x, torch.tensor([1, 2, 3])).shape)")
    proc = _run(code, CAI_KERNELS=impl, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == [repr([impl]), "torch.Size([3])"]


def test_env_override_rejects_unknown_names():
    proc = _run("import kernels; kernels.backend('logprob')", CAI_KERNELS="cuda")
    assert proc.returncode != 0 and "CAI_KERNELS" in proc.stderr


def test_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels;"
            "print(kernels.backend('logprob'));"
            "x = torch.randn(4, 10, requires_grad=True);"
            "kernels.logprob(x, torch.tensor([0, 1, 2, 3])).sum().backward(); print('ok')")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "ok"]


def test_override_context_switches_and_restores(monkeypatch):
    calls = []
    lp_mod = sys.modules["kernels.logprob"]
    monkeypatch.setitem(lp_mod._LOGPROB, "reference",
                        lambda *a, **k: calls.append("reference") or lp_mod.logprob_reference(*a, **k))
    before = kernels.backend("logprob")
    x, labels = torch.randn(2, 5), torch.tensor([0, 4])
    with kernels.override("reference", ops=["logprob"]):
        assert kernels.backend("logprob") == "reference"
        kernels.logprob(x, labels)
    assert calls == ["reference"]
    assert kernels.backend("logprob") == before
    with pytest.raises(ValueError):
        with kernels.override("cuda"):
            pass
    with pytest.raises(KeyError):
        kernels.backend("softmax")


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_every_public_op_runs_under_every_backend(impl):
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with kernels.override(impl):
        lp = kernels.logprob(torch.randn(8, 33, generator=gen), torch.arange(8))
        lp2 = kernels.linear_logprob(torch.randn(8, 4, generator=gen),
                                     torch.randn(33, 4, generator=gen), torch.arange(8))
        kernels.kl_penalty(lp, lp2, "k3")
        kernels.ppo_policy_loss(lp, lp2, torch.randn(8), torch.ones(8, dtype=torch.bool),
                                reduction="sequence", cu_seqlens=cu)
        kernels.ppo_value_loss(lp, lp2, torch.randn(8), torch.ones(8))
        kernels.option_probs(torch.randn(4, 2), clamp=(0.4, 0.6))
        kernels.bt_loss(lp[:4], lp2[:4])
        kernels.dpo_loss(lp[:4], lp2[:4], lp[4:], lp2[4:])
        q, kv = torch.randn(8, 3, 16), torch.randn(8, 1, 16)
        assert kernels.packed_attention(q, kv, kv, cu, 5).shape == (8, 3, 16)
        cache = torch.randn(2, 1, 6, 16)
        lengths = torch.tensor([2, 6], dtype=torch.int32)
        assert kernels.decode_attention(q[:2], cache, cache, lengths, 6).shape == (2, 3, 16)
