"""Training utilities: schedule, accumulation, clipping, the non-finite guard, checkpoints."""
import math

import pytest
import torch

from engine.train import (NonFiniteLossError, OptimConfig, Trainer, latest_checkpoint, list_checkpoints,
                          load_checkpoint, lr_at, save_checkpoint)


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == 1.0
    assert math.isclose(lr_at(9, cfg), 0.55)  # halfway: floor + (1 - floor) / 2
    assert math.isclose(lr_at(14, cfg), 0.1) and math.isclose(lr_at(100, cfg), 0.1)
    assert lr_at(50, OptimConfig(lr=3.0, warmup_steps=0, schedule="constant")) == 3.0


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_accumulation_equals_one_big_batch():
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    cfg = OptimConfig(lr=0.1, warmup_steps=0, max_grad_norm=0.0)
    a, b = net().eval(), net().eval()
    ta, tb = Trainer(a.parameters(), cfg), Trainer(b.parameters(), OptimConfig(**{**cfg.__dict__, "grad_accum": 2}))
    ta.backward(((a(x) - y) ** 2).sum() / 8)
    ta.apply()
    for half in (slice(0, 3), slice(3, 8)):  # uneven halves: the caller's scaling makes it exact
        assert not tb.ready
        tb.backward(((b(x[half]) - y[half]) ** 2).sum() / 8)
    assert tb.ready
    tb.apply()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_reports_the_norm_before_clipping():
    p = torch.nn.Parameter(torch.zeros(3))
    t = Trainer([p], OptimConfig(lr=1.0, warmup_steps=0, max_grad_norm=1.0))
    t.backward((p * torch.tensor([30.0, 40.0, 0.0])).sum())
    assert t.apply()["grad_norm"] == pytest.approx(50.0)


def test_non_finite_loss_names_the_step_and_takes_no_step():
    p = torch.nn.Parameter(torch.ones(2))
    t = Trainer([p], OptimConfig(lr=0.1, warmup_steps=0))
    t.backward(p.sum())
    t.apply()
    before = p.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss is nan"):
        t.backward(p.sum() * float("nan"))
    assert torch.equal(p, before) and p.grad is None


def run(model, trainer, steps):
    losses = []
    for _ in range(steps):
        g = torch.Generator().manual_seed(trainer.step)  # the data of a step depends on the step only
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 1, generator=g)
        losses.append(trainer.backward(((model(x) - y) ** 2).mean()))
        trainer.apply()
    return losses


def test_checkpoint_resume_gives_identical_losses(tmp_path):
    cfg = OptimConfig(lr=0.05, warmup_steps=2, total_steps=8, weight_decay=0.01)
    a = net().train()  # dropout on: the restored RNG must give the same masks
    ta = Trainer(a.parameters(), cfg)
    torch.manual_seed(123)
    full = run(a, ta, 8)

    b = net().train()
    tb = Trainer(b.parameters(), cfg)
    torch.manual_seed(123)
    assert run(b, tb, 4) == full[:4]
    save_checkpoint(tmp_path, tb.step, {"params": dict(b.named_parameters()), "optimizer": tb.optimizer,
                                        "meta": {"data_seed": 1}})
    torch.manual_seed(999)  # whatever happens between the runs

    c = net(seed=7).train()
    tc = Trainer(c.parameters(), cfg)
    state = load_checkpoint(latest_checkpoint(tmp_path), dict(c.named_parameters()), tc.optimizer)
    tc.step = state["step"]
    assert state == {"step": 4, "meta": {"data_seed": 1}}
    assert run(c, tc, 4) == full[4:]  # exactly: same weights, moments, schedule and masks


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    p = {"w": torch.ones(2)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"params": p}, keep=2)
    (tmp_path / ".tmp-ckpt-half").mkdir()  # what a kill mid-write leaves behind
    (tmp_path / "step-00000009").mkdir()  # a folder without state.json is not a checkpoint
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(latest_checkpoint(tmp_path), {"other": torch.ones(2)})


def test_non_finite_state_is_never_checkpointed_and_the_last_good_one_is_named(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    t = Trainer([p], OptimConfig(lr=0.1, warmup_steps=0))
    t.backward(p.sum())
    t.apply()
    good = save_checkpoint(tmp_path, 1, {"params": {"w": p}, "optimizer": t.optimizer})
    with pytest.raises(NonFiniteLossError, match=rf"step 2: 1 trained tensor.*w.*last good checkpoint: {good}"):
        save_checkpoint(tmp_path, 2, {"params": {"w": torch.tensor([1.0, float("nan")])}, "optimizer": t.optimizer})
    t.optimizer.state[p]["exp_avg_sq"].fill_(float("inf"))  # finite weights, poisoned moments
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*optimizer state\.0\.exp_avg_sq"):
        save_checkpoint(tmp_path, 3, {"params": {"w": p}, "optimizer": t.optimizer})
    assert list_checkpoints(tmp_path) == [good]
