"""LoRA adapters: identity at init, switching, a frozen base, save/load, peft and merged exports."""
import torch
import pytest

from engine import Engine, lora
from engine.batch import pack
from engine.errors import InputError

SEQS = [[1, 5, 7, 9, 11, 3, 40, 41], [4, 8, 2], [17]]


@pytest.fixture
def eng(tiny_model_dir):
    return Engine.load(tiny_model_dir("llama3"))  # untied lm_head, scaled rope: the harder mapping


def logits(model, seqs=SEQS):
    b = pack(seqs)
    with torch.no_grad():
        return model.logits(model(b.tokens, b.positions, b.context()))


def randomise(ad, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def base_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fresh_adapter_is_identity_and_switching_leaves_base_bit_identical(eng):
    m = eng.model
    before, ref = base_snapshot(m), logits(m)
    lora.add_adapter(m, "sft", lora.LoraConfig(rank=4, alpha=8), seed=0)
    with lora.use_adapter(m, "sft"):
        assert torch.equal(logits(m), ref)  # B = 0
    randomise(lora.get_adapter(m, "sft"))
    lora.copy_adapter(m, "sft", "policy")
    with lora.use_adapter(m, "policy"):
        on = logits(m)
        with lora.use_adapter(m, None):
            assert torch.equal(logits(m), ref)
        assert lora.active_adapter(m) == "policy"
    assert not torch.allclose(on, ref, atol=1e-4)
    assert lora.active_adapter(m) is None and torch.equal(logits(m), ref)
    after = base_snapshot(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in m.state_dict())  # adapters are not submodules of the base


def test_training_an_adapter_never_touches_the_base(eng):
    m = eng.model
    before = base_snapshot(m)
    ad = lora.add_adapter(m, "sft", lora.LoraConfig(rank=4, dropout=0.1), seed=0).train().requires_grad_(True)
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2)
    b = pack(SEQS)
    with lora.use_adapter(m, "sft"):
        for _ in range(3):
            loss = m.logits(m(b.tokens, b.positions, b.context())).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_adapter_on_fused_slice_matches_per_projection_math(eng):
    """An adapter on "k" alone changes only the k rows of qkv's output, by x A^T B^T alpha/r."""
    m = eng.model
    ad = lora.add_adapter(m, "k", lora.LoraConfig(rank=2, alpha=6, targets=("k",)))
    randomise(ad)
    qkv = m.layers[0].attn.qkv
    x = torch.randn(5, m.cfg.hidden_size)
    base = qkv(x)
    with lora.use_adapter(m, "k"):
        y = qkv(x)
    piece = ad.layers[0]["qkv"]
    hq, hkv = 4 * 16, 2 * 16
    expect = base.clone()
    expect[:, hq:hq + hkv] += x @ piece.A.t() @ piece.B["k"].t() * 3.0
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[:, :hq], base[:, :hq]) and torch.equal(y[:, hq + hkv:], base[:, hq + hkv:])


def test_save_load_roundtrip(eng, tmp_path):
    m = eng.model
    randomise(lora.add_adapter(m, "sft", lora.LoraConfig(rank=4, targets=("q", "v", "down"))))
    with lora.use_adapter(m, "sft"):
        want = logits(m)
    lora.save_adapter(m, "sft", tmp_path / "a")
    lora.load_adapter(m, "again", tmp_path / "a")
    with lora.use_adapter(m, "again"):
        assert torch.equal(logits(m), want)
    with pytest.raises(InputError, match="no adapter"):
        lora.set_adapter(m, "missing")
    with pytest.raises(InputError, match="targets"):
        lora.LoraConfig(targets=("q", "qkv"))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_peft_export_parity(tiny_model_dir, tmp_path, family):
    import peft
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(family)
    eng = Engine.load(folder)
    randomise(lora.add_adapter(eng.model, "sft", lora.LoraConfig(rank=4, alpha=8, targets=("q", "k", "o", "up", "down"))))
    with lora.use_adapter(eng.model, "sft"):
        ours = logits(eng.model, SEQS[:1])
    lora.export_peft(eng.model, "sft", tmp_path / "peft", str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(SEQS[:1])).logits[0]
    assert rel_err(ours, theirs) <= 1e-4


def test_merged_export_parity_and_live_base_untouched(eng, tmp_path):
    from transformers import AutoModelForCausalLM

    m = eng.model
    before, ref = base_snapshot(m), logits(m)
    randomise(lora.add_adapter(m, "sft", lora.LoraConfig(rank=4)))
    with lora.use_adapter(m, "sft"):
        ours = logits(m)
    lora.export_merged(m, "sft", tmp_path / "merged", eng.tokenizer, eng.source)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(logits(m), ref)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        for seq, start in ((SEQS[0], 0), (SEQS[1], len(SEQS[0]))):
            theirs = hf(torch.tensor([seq])).logits[0]
            assert rel_err(ours[start:start + len(seq)], theirs) <= 1e-4
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
