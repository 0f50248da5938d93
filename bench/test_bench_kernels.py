"""pytest-benchmark microbenchmarks: `make bench-pytest` (not part of `make test`).

On CUDA: linear_logprob fwd+bwd per implementation at a mid-size shape (override with
RESRL_BENCH_SHAPE="N,D,V"). On CPU: the torch paths at a small shape. Compare runs with
`pytest bench/ --benchmark-compare`.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import linear_logprob, residual_weights, subspace_basis, subspace_residual

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEFAULT_SHAPE = "4096,2048,151936" if CUDA else "512,128,8192"
N, D, V = (int(x) for x in os.environ.get("RESRL_BENCH_SHAPE", DEFAULT_SHAPE).split(","))
IMPLS = ["triton", "torch"] if CUDA else ["torch"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(N, D, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    w = (torch.randn(V, D, device=DEVICE, dtype=DTYPE, generator=g) * D**-0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    return h, w, t


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprob_fwd(benchmark, monkeypatch, inputs, impl):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
    h, w, t = inputs

    def run():
        with torch.no_grad():
            linear_logprob(h, w, t)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprob_fwdbwd(benchmark, monkeypatch, inputs, impl):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
    h, w, t = inputs
    coef = torch.randn(N, device=DEVICE)

    def run():
        h.grad = w.grad = None
        lp, _ = linear_logprob(h, w, t)
        (lp * coef).sum().backward()
        _sync()

    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
def test_resrl_weights_pipeline(benchmark, monkeypatch, impl):
    """Basis for 8 groups + residual + weights for all negative tokens: the ResRL overhead."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
    groups, per_group = 8, max(N // 8, 8)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(groups * per_group, D, device=DEVICE, dtype=DTYPE, generator=g)
    group_index = torch.arange(groups, device=DEVICE).repeat_interleave(per_group)
    valid = torch.ones_like(group_index, dtype=torch.bool)

    def run():
        bases, means = [], []
        for k in range(groups):
            b, m = subspace_basis(hidden[group_index == k][: per_group // 2], rank=64)
            bases.append(torch.nn.functional.pad(b, (0, 64 - b.shape[1])))
            means.append(m)
        dist = subspace_residual(hidden, torch.stack(bases), torch.stack(means), group_index)
        residual_weights(dist, group_index, valid)
        _sync()

    benchmark(run)
