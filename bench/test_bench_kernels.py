"""pytest-benchmark suite over the kernels: `pytest bench --benchmark-only`.

The same cases as `python -m bench.kernels` (forward+backward, our torch path against the
peers), at the smaller size so a run takes minutes; the module is the place for peak memory
and floors, this suite for pytest-benchmark's statistics and comparisons between runs.
"""
import argparse

import pytest

from bench.kernels import CASES, IMPLS, _fwd_bwd

ARGS = argparse.Namespace(vocab=49152, hidden=576, dev="cpu", heads=None, attention_lens=None)
SIZES = {"logprob": 2048, "linear_logprob": 2048, "linear_logprob_frozen_weight": 2048,
         "ppo_loss": 8192, "preference": 4096,
         "attention": "mixed"}
PARAMS = [(op, impl) for op in CASES for impl in IMPLS[op]]


@pytest.mark.parametrize("op,impl", PARAMS, ids=[f"{op}-{impl}" for op, impl in PARAMS])
def test_fwd_bwd(benchmark, op, impl):
    fwd, loss, leaves = CASES[op](SIZES[op], impl, ARGS)
    benchmark.group = op
    run = _fwd_bwd(fwd, loss, leaves)
    heavy = op not in ("ppo_loss", "preference")
    benchmark.pedantic(run, rounds=3 if heavy else 100, iterations=1, warmup_rounds=1)
    assert all(x.grad is not None for x in leaves)
