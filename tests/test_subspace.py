"""subspace_basis, subspace_residual and residual_weights against the float64 references.

Each case runs the kernel on the `device` of its `impl` (tests/conftest.py: the Triton path on
CUDA, or under the interpreter on the CPU; the PyTorch path on the CPU) and compares on the CPU."""

from __future__ import annotations

import pytest
import torch

from kernels import residual_weights, subspace_basis, subspace_residual
from kernels.reference import (
    layer_norm_no_affine,
    residual_weights_reference,
    subspace_basis_reference,
    subspace_residual_reference,
)
from kernels.subspace import _block_table

# Per-token abs error of dist against float64 on the same rounded inputs, relative to ||z||^2 / D:
# dist = (||z||^2 - ||V^T z||^2) / D cancels for tokens near the subspace, so fp32 rounding scales
# with ||z||^2, not with dist. bf16 inputs are upcast exactly, hence the same tolerance. The same
# on every device: fp32 throughout with IEEE dots, in the interpreter and on CUDA.
RESIDUAL_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6}


def residual_error(got, hidden, basis, mean, group_index=None) -> float:
    """max over tokens of |got - reference| / (||z||^2 / D), all in float64 on the device of `hidden`."""
    want = subspace_residual_reference(hidden.double(), basis.double(), mean.double(), group_index)
    if basis.dim() == 2:
        mean = mean[None]
        group_index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    z = layer_norm_no_affine(hidden.double()) - mean.double()[group_index.long()]
    scale = (z**2).mean(-1)
    return ((got.double() - want).abs() / scale).max().item()


# Projector (V V^T) max abs error against the exact SVD, fp32 randomized PCA.
PROJECTOR_TOL = 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cpu(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A kernel's outputs, brought to the CPU to be compared with the CPU references."""
    return tuple(t.cpu() for t in tensors)


def projector(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v @ v.T


def separated_pool(m: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with k strong, well-separated principal directions plus weak isotropic noise."""
    g = gen(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    w = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
    s = torch.linspace(300.0, 150.0, k)
    return (u * s) @ w.T + 0.3 * torch.randn(m, d, generator=g)


# --------------------------------------------------------------------------- subspace_basis


@pytest.mark.parametrize("niter", [1, 4])
def test_basis_matches_exact_svd_on_separated_spectrum(impl, device, niter):
    pool = separated_pool(200, 96, 8)
    basis, mean = cpu(*subspace_basis(pool.to(device), rank=8, niter=niter, generator=gen(1)))
    want_basis, want_mean = subspace_basis_reference(pool.double(), rank=8)
    assert basis.shape == (96, 8) and basis.dtype == torch.float32
    assert mean.shape == (96,) and mean.dtype == torch.float32
    assert (projector(basis) - projector(want_basis)).abs().max() < PROJECTOR_TOL
    assert (mean.double() - want_mean).abs().max() < 1e-5


def test_basis_is_exact_when_width_covers_the_pool(impl, device):
    # M'=12 < D: k = 11 = rank of the centered pool, width min(21, 12) = 12: no spectral gap needed.
    pool = torch.randn(12, 40, generator=gen(2))
    basis, _ = cpu(*subspace_basis(pool.to(device), rank=64, generator=gen(3)))
    want, _ = subspace_basis_reference(pool.double(), rank=64)
    assert basis.shape == (40, 11)
    assert (projector(basis) - projector(want)).abs().max() < PROJECTOR_TOL


def test_basis_captures_near_optimal_variance_without_gap(impl, device):
    # Isotropic noise has no well-defined top-k subspace; the captured variance must still be close.
    pool = torch.randn(300, 96, generator=gen(4))
    basis, mean = cpu(*subspace_basis(pool.to(device), rank=16, generator=gen(5)))
    want, want_mean = subspace_basis_reference(pool.double(), rank=16)
    a = layer_norm_no_affine(pool.double()) - want_mean
    got_var = (a @ basis.double()).pow(2).sum()
    best_var = (a @ want).pow(2).sum()
    assert got_var <= best_var * (1 + 1e-9)
    assert got_var >= 0.97 * best_var


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_basis_is_orthonormal(impl, device, dtype):
    pool = torch.randn(64, 72, generator=gen(6)).to(dtype)
    basis, _ = cpu(*subspace_basis(pool.to(device), rank=16, generator=gen(7)))
    eye = torch.eye(16)
    assert (basis.T @ basis - eye).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("m", "d", "rank", "max_tokens", "want_k"),
    [
        (5, 32, 64, 4096, 4),
        # LayerNormed rows are orthogonal to the all-ones vector: the span has at most D - 1 = 7
        # directions (the 8th singular value is zero and is dropped as outside the span).
        (50, 8, 64, 4096, 7),
        (30, 32, 3, 4096, 3),
        (100, 32, 64, 10, 9),
        (2, 16, 4, 4096, 1),
    ],
    ids=["rank>pool", "rank>D", "rank<all", "rank>subsample", "two_tokens"],
)
def test_basis_k_is_min_of_rank_pool_minus_one_and_d(impl, device, m, d, rank, max_tokens, want_k):
    pool = torch.randn(m, d, generator=gen(8)).to(device)
    basis, mean = subspace_basis(pool, rank=rank, max_tokens=max_tokens)
    assert basis.shape == (d, want_k) and mean.shape == (d,)


def test_basis_subsampling_is_deterministic_and_matches_reference_pool(impl, device):
    pool = torch.randn(300, 48, generator=gen(9))
    a_basis, a_mean = cpu(*subspace_basis(pool.to(device), rank=64, max_tokens=40, generator=gen(7)))
    b_basis, b_mean = cpu(*subspace_basis(pool.to(device), rank=64, max_tokens=40, generator=gen(7)))
    assert torch.equal(a_basis, b_basis) and torch.equal(a_mean, b_mean)
    # Same generator seed: same 40-token pool as the reference, so the same mean and (k = 39, width
    # 40 = M') the same span.
    want_basis, want_mean = subspace_basis_reference(pool.double(), rank=64, max_tokens=40, generator=gen(7))
    assert a_basis.shape == (48, 39)
    assert (a_mean.double() - want_mean).abs().max() < 1e-5
    assert (projector(a_basis) - projector(want_basis)).abs().max() < PROJECTOR_TOL
    _, other_mean = cpu(*subspace_basis(pool.to(device), rank=64, max_tokens=40, generator=gen(8)))
    assert (other_mean - a_mean).abs().max() > 1e-3


def test_basis_without_subsampling_uses_the_whole_pool(impl, device):
    pool = torch.randn(60, 24, generator=gen(10))
    _, mean = cpu(*subspace_basis(pool.to(device), rank=4, max_tokens=60, generator=gen(0)))
    assert (mean.double() - layer_norm_no_affine(pool.double()).mean(0)).abs().max() < 1e-6


@pytest.mark.gpu
def test_basis_cuda_bf16_matches_exact_svd_at_model_width(monkeypatch):
    """A bf16 pool on CUDA at D = 2560 with M = 5003 rows (no block multiple, above max_tokens, so the
    subsample runs) against the float64 exact SVD of the same rounded, subsampled pool. Outputs
    only: the subspace functions are not differentiable."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    pool = separated_pool(5003, 2560, 16).bfloat16()
    basis, mean = subspace_basis(pool.cuda(), rank=16, max_tokens=4096, generator=gen(1))
    assert basis.device.type == "cuda" and basis.shape == (2560, 16)
    want_basis, want_mean = subspace_basis_reference(
        pool.double(), rank=16, max_tokens=4096, generator=gen(1)
    )
    basis, mean = cpu(basis, mean)
    assert (projector(basis) - projector(want_basis)).abs().max() < PROJECTOR_TOL
    assert (mean.double() - want_mean).abs().max() < 1e-5


# --------------------------------------------------------------------------- subspace_residual


def orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q.float()


def residual_inputs(n: int, d: int, groups: int, ks: list[int], k_pad: int, seed: int = 0):
    """Per-group orthonormal bases (columns beyond each group's k zero), means, interleaved tokens,
    and hidden rows of which half lie near their group's subspace (where the identity cancels)."""
    g = gen(seed)
    basis = torch.zeros(groups, d, k_pad)
    for i, k in enumerate(ks):
        basis[i, :, :k] = orthonormal(d, k, g)
    mean = 0.3 * torch.randn(groups, d, generator=g)
    group_index = torch.randint(0, groups, (n,), generator=g)
    hidden = torch.randn(n, d, generator=g) * 2 + 0.5
    near = torch.arange(n) % 2 == 0
    coef = torch.randn(n, k_pad, generator=g) * 3
    on_sub = mean[group_index] + torch.einsum("ndk,nk->nd", basis[group_index], coef)
    hidden[near] = on_sub[near] + 0.05 * torch.randn(int(near.sum()), d, generator=g)
    return hidden, basis, mean, group_index


# name: (N, D, groups, per-group k, padded k)
RESIDUAL_CASES = {
    "one_token": (1, 32, 1, [4], 4),
    "not_block_multiple": (37, 40, 2, [5, 5], 5),
    "d_not_pow2": (20, 72, 1, [16], 16),
    "interleaved_groups": (70, 96, 4, [16, 16, 16, 16], 16),
    "zero_padded_columns": (53, 48, 3, [3, 8, 16], 16),
    "some_groups_empty": (9, 40, 6, [2, 2, 2, 2, 2, 2], 2),
    "rank_spans_basis_slices": (30, 64, 2, [40, 33], 40),  # 3 slices of 16 under the interpreter
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(RESIDUAL_CASES), ids=list(RESIDUAL_CASES))
def test_residual_matches_reference(impl, device, case, dtype):
    n, d, groups, ks, k_pad = RESIDUAL_CASES[case]
    hidden, basis, mean, group_index = residual_inputs(n, d, groups, ks, k_pad)
    hidden = hidden.to(dtype)
    got = subspace_residual(*(x.to(device) for x in (hidden, basis, mean, group_index)))
    assert got.shape == (n,) and got.dtype == torch.float32 and got.device.type == device.type
    got = got.cpu()
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert residual_error(got, hidden, basis, mean, group_index) < RESIDUAL_TOL[dtype]


def test_residual_two_dim_basis_and_no_group_index(impl, device):
    hidden, basis, mean, _ = residual_inputs(33, 56, 1, [7], 7, seed=1)
    got = subspace_residual(hidden.to(device), basis[0].to(device), mean[0].to(device)).cpu()
    assert residual_error(got, hidden, basis[0], mean[0]) < RESIDUAL_TOL[torch.float32]
    # The same single group given as [1, D, k] with explicit indices (int32 accepted).
    group_index = torch.zeros(33, dtype=torch.int32)
    again = subspace_residual(*(x.to(device) for x in (hidden, basis, mean, group_index))).cpu()
    assert residual_error(again, hidden, basis, mean, group_index) < RESIDUAL_TOL[torch.float32]


def test_residual_accepts_strided_hidden_rows(impl, device):
    hidden, basis, mean, group_index = residual_inputs(21, 40, 2, [4, 6], 6, seed=5)
    wide = torch.randn(21, 56)
    wide[:, 8:48] = hidden
    view = wide.to(device)[:, 8:48]  # row stride 56, not contiguous
    got = subspace_residual(view, *(x.to(device) for x in (basis, mean, group_index))).cpu()
    assert residual_error(got, hidden, basis, mean, group_index) < RESIDUAL_TOL[torch.float32]


def test_residual_large_row_offset_keeps_layernorm_accurate(impl, device):
    # Rows with |mean| >> std: E[x^2] - E[x]^2 in fp32 would lose the variance.
    hidden, basis, mean, group_index = residual_inputs(24, 64, 2, [8, 8], 8, seed=2)
    hidden = hidden + 300.0
    got = subspace_residual(*(x.to(device) for x in (hidden, basis, mean, group_index))).cpu()
    assert residual_error(got, hidden, basis, mean, group_index) < 2e-5


def test_residual_is_zero_inside_the_subspace_and_full_outside(impl, device):
    d = 48
    # A basis orthogonal to the all-ones vector: LN only rescales rows in its span (their mean is 0).
    raw = torch.randn(d, 4, generator=gen(3), dtype=torch.float64)
    basis = torch.linalg.qr(raw - raw.mean(0)).Q.float()
    mean = torch.zeros(d)
    inside = 7.0 * (basis @ torch.tensor([3.0, -2.0, 1.0, 0.5]))
    got = subspace_residual(inside[None].to(device), basis.to(device), mean.to(device)).cpu()
    assert got.abs().max() < 1e-5
    inside = layer_norm_no_affine(inside[None])[0]
    empty_basis = torch.zeros(d, 0)
    full = subspace_residual(inside[None].to(device), empty_basis.to(device), mean.to(device)).cpu()
    assert (full - (inside**2).sum() / d).abs().max() < 1e-5


def test_residual_empty_input(impl, device):
    basis, mean = orthonormal(16, 2, gen(4)), torch.zeros(16)
    out = subspace_residual(torch.zeros(0, 16, device=device), basis.to(device), mean.to(device))
    assert out.shape == (0,) and out.dtype == torch.float32 and out.device.type == device.type


@pytest.mark.parametrize("block_n", [1, 4, 16])
def test_block_table_covers_each_sorted_token_once_with_its_group(block_n):
    group_index = torch.tensor([3, 0, 3, 3, 5, 0, 3, 3, 3, 5, 3])  # groups 1, 2, 4 empty
    n, g = group_index.shape[0], 6
    order, grp, start, end, programs = _block_table(group_index, n, g, block_n, group_index.device)
    assert programs == grp.shape[0] == start.shape[0] == end.shape[0]
    seen = torch.zeros(n, dtype=torch.int64)
    for p in range(programs):
        s, e = int(start[p]), min(int(end[p]), int(start[p]) + block_n)
        for pos in range(s, e):
            tok = int(order[pos])
            seen[tok] += 1
            assert int(group_index[tok]) == int(grp[p])
    assert torch.equal(seen, torch.ones(n, dtype=torch.int64))


@pytest.mark.gpu
def test_residual_cuda_bf16_matches_reference_at_model_width(monkeypatch):
    """bf16 hidden states on CUDA at Qwen3-4B's width (D = 2560) against the float64 reference (on
    the GPU): N no multiple of the 64-token block, group ranks 61 down to 16 stacked in a
    [G, D, 61] basis (zero columns; the kernel pads k to 64)."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    n, d, groups = 4001, 2560, 16
    ks = [61 - 3 * i for i in range(groups)]
    hidden, basis, mean, group_index = (x.cuda() for x in residual_inputs(n, d, groups, ks, 61))
    hidden = hidden.bfloat16()
    got = subspace_residual(hidden, basis, mean, group_index)
    assert got.device.type == "cuda" and torch.isfinite(got).all() and (got >= 0).all()
    assert residual_error(got, hidden, basis, mean, group_index) < RESIDUAL_TOL[torch.bfloat16]


# --------------------------------------------------------------------------- residual_weights


def check_weights(device, dist, group_index, valid, **kw) -> torch.Tensor:
    """The kernel on `device` against the reference on the CPU; returns the kernel's weights (CPU)."""
    got = residual_weights(dist.to(device), group_index.to(device), valid.to(device), **kw)
    assert got.device.type == device.type
    got = got.cpu()
    want = residual_weights_reference(dist, group_index, valid, **kw)
    assert got.shape == dist.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-6
    assert (got <= 1.0).all()
    return got


def test_weights_hand_computed_single_group(impl, device):
    # 0.2 / 0.8 quantiles of 1..5 at positions 0.8 and 3.2: 1.8 and 4.2, spread 2.4.
    dist = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0])
    got = check_weights(device, dist, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.bool))
    want = torch.tensor([0.55, 0.1, 1.0, 0.1 + 0.9 * 0.2 / 2.4, 0.1 + 0.9 * 2.2 / 2.4])
    assert (got - want).abs().max() < 1e-6


def test_weights_one_positive_distance(impl, device):
    # Four zeros and one positive: q_lo = 0, q_hi = 0.2 * 5 = 1 (position 3.2 between 0 and 5).
    dist = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0])
    got = check_weights(device, dist, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.bool))
    assert torch.allclose(got, torch.tensor([0.1, 0.1, 1.0, 0.1, 0.1]))


def test_weights_all_equal_and_single_token_groups_are_flat(impl, device):
    dist = torch.tensor([0.7, 0.7, 0.7, 0.2, 9.0, 0.3])
    group_index = torch.tensor([4, 4, 4, 8, 8, 8])
    # Group 8 has one valid token: quantiles equal that token, so it is flat too.
    valid = torch.tensor([True, True, True, False, True, False])
    got = check_weights(device, dist, group_index, valid)
    assert torch.allclose(got, torch.tensor([0.55, 0.55, 0.55, 1.0, 0.55, 1.0]))


def test_weights_many_groups_invalid_tokens_and_sparse_ids(impl, device):
    g = gen(11)
    n = 70
    ids = torch.tensor([-3, 0, 7, 1000, 12, 5])
    group_index = ids[torch.randint(0, len(ids), (n,), generator=g)]
    dist = torch.rand(n, generator=g) * 2
    valid = torch.rand(n, generator=g) > 0.25
    valid[group_index == 12] = False  # a group with no valid token at all
    dist[~valid] = float("nan")  # invalid tokens may carry anything
    got = check_weights(device, dist, group_index, valid)
    assert (got[~valid] == 1.0).all()
    assert (got[valid] >= 0.1 - 1e-7).all()


@pytest.mark.parametrize(
    ("q_low", "q_high", "min_weight"), [(0.0, 1.0, 0.0), (0.1, 0.5, 1.0), (0.3, 0.7, 0.25)]
)
def test_weights_other_levels(impl, device, q_low, q_high, min_weight):
    g = gen(12)
    dist = torch.rand(40, generator=g)
    group_index = torch.randint(0, 3, (40,), generator=g)
    valid = torch.rand(40, generator=g) > 0.2
    check_weights(device, dist, group_index, valid, q_low=q_low, q_high=q_high, min_weight=min_weight)


def test_weights_accepts_bf16_and_int32(impl, device):
    dist = torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.bfloat16)
    group_index = torch.tensor([1, 1, 1, 1], dtype=torch.int32)
    valid = torch.ones(4, dtype=torch.bool)
    got = residual_weights(dist.to(device), group_index.to(device), valid.to(device)).cpu()
    want = residual_weights_reference(dist.float(), group_index.long(), valid)
    assert (got - want).abs().max() < 1e-6


def test_weights_empty_input(impl, device):
    empty = torch.zeros(0, device=device)
    no_group = torch.zeros(0, dtype=torch.long, device=device)
    out = residual_weights(empty, no_group, torch.zeros(0, dtype=torch.bool, device=device))
    assert out.shape == (0,) and out.device.type == device.type


@pytest.mark.gpu
def test_weights_cuda_bf16_match_reference(monkeypatch):
    """bf16 distances on CUDA: N no multiple of the 1024-token block, 50 groups with sparse negative
    and positive ids, a fifth of the tokens invalid; against the float64 reference."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    g = gen(13)
    n = 5003
    group_index = torch.randint(0, 50, (n,), generator=g) * 7 - 20
    dist = (torch.rand(n, generator=g) * 3).bfloat16()
    valid = torch.rand(n, generator=g) > 0.2
    got = check_weights(torch.device("cuda"), dist, group_index, valid)
    assert (got[valid] >= 0.1 - 1e-7).all() and (got[~valid] == 1.0).all()


# --------------------------------------------------------------------------- errors


def _pool(m=8, d=16):
    return torch.randn(m, d)


def _res_args(n=5, d=16, groups=2, k=3):
    return (
        torch.randn(n, d),
        torch.zeros(groups, d, k),
        torch.zeros(groups, d),
        torch.zeros(n, dtype=torch.long),
    )


def _w_args(n=5):
    return torch.rand(n), torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)


def _nan_hidden():
    h, b, m, gi = _res_args()
    h[2, 3] = float("nan")
    return subspace_residual(h, b, m, gi)


ERROR_CASES = {
    "basis_hidden_1d": (lambda: subspace_basis(torch.randn(8)), ValueError, "pos_hidden must have 2 dims"),
    "basis_int_dtype": (lambda: subspace_basis(torch.ones(8, 4, dtype=torch.long)), TypeError, "pos_hidden has dtype int64"),
    "basis_one_token": (lambda: subspace_basis(_pool(1)), ValueError, "at least 2 tokens"),
    "basis_rank_zero": (lambda: subspace_basis(_pool(), rank=0), ValueError, "rank must be >= 1"),
    "basis_rank_float": (lambda: subspace_basis(_pool(), rank=2.5), TypeError, "rank must be an int"),
    "basis_max_tokens_one": (lambda: subspace_basis(_pool(), max_tokens=1), ValueError, "max_tokens must be >= 2"),
    "basis_negative_niter": (lambda: subspace_basis(_pool(), niter=-1), ValueError, "niter must be >= 0"),
    "basis_bad_generator": (lambda: subspace_basis(_pool(), generator=3), TypeError, "generator must be a torch.Generator"),
    "basis_nan": (lambda: subspace_basis(_pool().index_fill(0, torch.tensor([1]), float("inf"))), ValueError, "pos_hidden contains NaN or Inf"),
    "res_hidden_3d": (lambda: subspace_residual(torch.randn(2, 3, 16), *_res_args()[1:]), ValueError, "hidden must have 2 dims"),
    "res_hidden_int": (lambda: subspace_residual(torch.ones(5, 16, dtype=torch.int32), *_res_args()[1:]), TypeError, "hidden has dtype int32"),
    "res_hidden_d_zero": (lambda: subspace_residual(torch.randn(5, 0), torch.zeros(0, 2), torch.zeros(0)), ValueError, "hidden has D=0"),
    "res_basis_d_mismatch": (lambda: subspace_residual(torch.randn(5, 12), *_res_args()[1:]), ValueError, "basis has D=16"),
    "res_mean_shape": (lambda: subspace_residual(_res_args()[0], _res_args()[1], torch.zeros(3, 16), _res_args()[3]), ValueError, r"mean has shape \(3, 16\)"),
    "res_mean_dims_2d_basis": (lambda: subspace_residual(torch.randn(5, 16), torch.zeros(16, 3), torch.zeros(1, 16)), ValueError, r"mean must be \[D\]"),
    "res_mean_dims_3d_basis": (lambda: subspace_residual(torch.randn(5, 16), torch.zeros(2, 16, 3), torch.zeros(16)), ValueError, r"mean must be \[G, D\]"),
    "res_group_len": (lambda: subspace_residual(*_res_args()[:3], torch.zeros(4, dtype=torch.long)), ValueError, "group_index has 4 entries"),
    "res_group_dtype": (lambda: subspace_residual(*_res_args()[:3], torch.zeros(5)), TypeError, "group_index has dtype float32"),
    "res_group_missing": (lambda: subspace_residual(*_res_args()[:3]), ValueError, "group_index is required"),
    "res_group_range": (lambda: subspace_residual(*_res_args()[:3], torch.tensor([0, 1, 2, 0, 1])), ValueError, r"group_index has entries outside \[0, G=2\)"),
    "res_group_negative": (lambda: subspace_residual(*_res_args()[:3], torch.tensor([0, -1, 0, 0, 1])), ValueError, "outside"),
    "res_nan_hidden": (_nan_hidden, ValueError, "hidden contains NaN or Inf"),
    "w_dist_2d": (lambda: residual_weights(torch.rand(5, 1), *_w_args()[1:]), ValueError, "dist must have 1 dims"),
    "w_valid_dtype": (lambda: residual_weights(*_w_args()[:2], torch.ones(5)), TypeError, "valid has dtype float32"),
    "w_group_dtype": (lambda: residual_weights(_w_args()[0], torch.zeros(5), _w_args()[2]), TypeError, "group_index has dtype float32"),
    "w_length": (lambda: residual_weights(torch.rand(4), *_w_args()[1:]), ValueError, "one entry per token"),
    "w_q_order": (lambda: residual_weights(*_w_args(), q_low=0.8, q_high=0.2), ValueError, "q_low < q_high"),
    "w_q_range": (lambda: residual_weights(*_w_args(), q_high=1.5), ValueError, "q_low < q_high <= 1"),
    "w_min_weight": (lambda: residual_weights(*_w_args(), min_weight=1.5), ValueError, r"min_weight must be in \[0, 1\]"),
    "w_nan_valid": (lambda: residual_weights(torch.tensor([0.1, float("nan")]), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)), ValueError, "dist contains NaN or Inf at valid tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_bad_inputs_raise_clear_errors(impl, device, case, monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_CHECKS", "1")
    fn, exc, match = ERROR_CASES[case]
    # The tensors a case builds (all without a generator) are made on the case's device.
    with pytest.raises(exc, match=match), torch.device(device):
        fn()


def test_value_checks_can_be_skipped(impl, device, monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_CHECKS", "0")
    h, b, m, _ = _res_args()
    h[0, 0] = float("nan")
    gi = torch.tensor([0, 1, 1, 0, 1])
    # No error is raised; the NaN row's value is unspecified, the other rows are unaffected.
    out = subspace_residual(*(x.to(device) for x in (h, b, m, gi))).cpu()
    want = subspace_residual_reference(h[1:].double(), b.double(), m.double(), gi[1:])
    assert (out[1:].double() - want).abs().max() < 1e-5


def test_unknown_impl_is_rejected(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="RESRL_KERNEL_IMPL"):
        subspace_residual(*_res_args())


def test_basis_drops_directions_outside_the_pool_span(impl, device):
    # 6 distinct rows plus 3 copies of the first: the centered pool has rank 5, not M - 1 = 8.
    distinct = torch.randn(6, 32)
    pool = torch.cat([distinct, distinct[:1].repeat(3, 1)])
    basis, _ = subspace_basis(pool.to(device), rank=64, generator=torch.Generator().manual_seed(0))
    ref_basis, _ = subspace_basis_reference(pool.double(), rank=64)
    assert basis.shape == (32, 5) and ref_basis.shape == (32, 5)


def test_distances_are_stable_under_rounding_noise_with_duplicate_rows():
    distinct = torch.randn(6, 32)
    pool = torch.cat([distinct, distinct[:1].repeat(3, 1)])
    neg = torch.randn(20, 32)
    dists = []
    for noise in (0.0, 1e-6):
        noisy = pool + noise * torch.randn(pool.shape)
        basis, mean = subspace_basis(noisy, rank=64, generator=torch.Generator().manual_seed(0))
        dists.append(subspace_residual(neg, basis, mean))
    torch.testing.assert_close(dists[1], dists[0], atol=1e-4, rtol=1e-4)
