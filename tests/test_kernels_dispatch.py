"""Dispatch: chosen by the inputs' device once per (op, device type), CAI_KERNELS and
in-process overrides, no triton, and the engine on the CPU of a machine that has CUDA."""
import os
import subprocess
import sys
from pathlib import Path


import pytest
import torch

import kernels
from kernels import _dispatch

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


def test_cpu_tensors_run_torch_when_cuda_is_reported(monkeypatch):
    """Every GPU machine reports CUDA: CPU tensors must still run the torch path, CUDA
    tensors the Triton one, each resolved once per (op, device type)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CAI_KERNELS", raising=False)
    monkeypatch.setattr(_dispatch, "_resolved", {})
    for op in kernels.OPS:
        assert kernels.backend(op, torch.device("cpu")) == "torch"
        assert kernels.backend(op, "cuda:1") == "triton"
        assert kernels.backend(op) == "triton"  # no device: the machine's default
    assert _dispatch._resolved[("logprob", "cpu")] == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a real GPU run: not interpreted
    calls = []
    lp_mod = sys.modules["kernels.logprob"]
    monkeypatch.setitem(lp_mod._LOGPROB, "triton", lambda *a, **k: calls.append("triton"))
    x = torch.randn(3, 40, requires_grad=True)
    lp = kernels.logprob(x, torch.tensor([1, 2, 3]))
    lp.sum().backward()
    assert calls == [] and torch.isfinite(x.grad).all()
    q, kv = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    assert kernels.packed_attention(q, kv, kv, cu, 5).shape == (5, 2, 16)


def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.override("triton", ops=["logprob"]):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.logprob(torch.randn(2, 5), torch.tensor([0, 1]))
        assert kernels.backend("logprob", "cuda") == "triton"


def test_triton_launchers_reject_inputs_on_two_devices():
    """Triton launches on the current device: inputs elsewhere must be refused up front."""
    from kernels._triton import launch_device

    with pytest.raises(ValueError, match="share one device"):
        launch_device(torch.empty(2), torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="CUDA tensors"):
        launch_device(torch.empty(2, device="meta"))
    attn = sys.modules["kernels.attention"]
    q, kv = torch.randn(4, 2, 16), torch.randn(4, 1, 16)
    with pytest.raises(ValueError, match="share one device"):
        attn.packed_attention_triton(q, kv, kv, torch.tensor([0, 4], device="meta"), 4)


def test_engine_generates_on_the_cpu_when_cuda_is_reported(tiny_model_dir):
    """The snippet of a GPU machine's first run: CUDA reported, the model on the CPU, the
    Triton interpreter off (as on a real GPU machine)."""
    folder = tiny_model_dir()
    code = ("import inspect, torch; torch.cuda.is_available = lambda: True\n"
            "from engine import Engine, SamplingParams\n"
            "kw = {'device': 'cpu'} if 'device' in inspect.signature(Engine.load).parameters "
            "else {}\n"
            f"out = Engine.load({str(folder)!r}, **kw).generate(['Hello'], "
            "SamplingParams(max_new_tokens=4, temperature=0))\n"
            "print(len(out))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CAI_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1"


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
