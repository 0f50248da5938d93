"""ResRL subspace kernels: positive-pool basis, per-token residual distance, per-group weights.

Math: ALGORITHMS.md §4.2-4.6. Three public functions, each validating its inputs and then
dispatching with `select_impl` (Triton on CUDA or under `TRITON_INTERPRET=1`, PyTorch elsewhere):

- `subspace_basis`: randomized PCA of the LayerNormed, subsampled, centered positive pool. A few
  small GEMMs, QR factorizations and one SVD of a [k+p, D] matrix: PyTorch on both paths.
- `subspace_residual`: one Triton kernel. Tokens are sorted by group and a block table is built on
  the device (no host sync); each program owns up to BLOCK_N tokens of one group, computes their
  LayerNorm statistics in a first pass over D, then forms z = LN(h) - mu_g chunk by chunk and
  accumulates ||z||^2 and z V_g with `tl.dot`.
- `residual_weights`: per-group quantiles from one sort in PyTorch on both paths (no loop over
  groups, no host sync); a Triton kernel fuses the per-token gather and normalization.

Nothing here is differentiable: the weights are computed from detached hidden states (§4.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    interpreting,
    raise_if_any,
    select_impl,
    value_checks_enabled,
)
from kernels.reference import LN_EPS, numerical_rank, subsample_indices

# Extra columns of the randomized range finder beyond k (Halko et al. 2011 use 5-10).
OVERSAMPLE = 10
# Bytes of fp32 scratch (LN rows plus gathered per-token bases) one torch-path chunk may use.
TORCH_CHUNK_BYTES = 64 * 2**20
# Quantile spread below which a group's weights are constant (ALGORITHMS.md §4.6).
FLAT_SPREAD = 1e-5

INDEX_DTYPES = (torch.int64, torch.int32)
DIST_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------- subspace_basis


def subspace_basis(
    pos_hidden: torch.Tensor,
    *,
    rank: int = 64,
    max_tokens: int = 4096,
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of the LayerNormed positive pool: (basis [D, k], mean [D]), fp32.

    Args:
        pos_hidden: [M, D] fp32/bf16/fp16 hidden states of valid tokens of positive responses.
        rank: wanted k; the returned k = min(rank, M' - 1, D, numerical rank of the centered pool)
            where M' = min(M, max_tokens).
        max_tokens: pool cap; above it a uniform subset is drawn with `generator` using
            `kernels.reference.subsample_indices`, so the pool equals the reference's pool for the
            same generator state.
        niter: power iterations of the randomized range finder (each re-orthonormalized by QR).
        generator: CPU `torch.Generator` for the subsample and the Gaussian test matrix (drawn in
            that order); None uses the global CPU RNG. Same seed, same device: same basis.

    Returns:
        basis [D, k] fp32 with orthonormal columns (top right singular vectors of P - mu, in
        descending singular-value order; signs arbitrary) and mean mu [D] fp32.

    Departure from ALGORITHMS.md §4.4 (k = min(64, M - 1, D)): directions whose singular value is
    zero up to rounding are dropped (`numerical_rank`). They are not part of the positives' span;
    keeping them made distances depend on rounding (the G responses of a prompt share the hidden
    state that predicts their first token, so duplicate rows are the rule, and a pool of M' <= 65
    tokens then has rank < M' - 1). Seen before the fix: ResRL weights moved by up to 4e-3 between
    1 and 2 CPU threads.

    Departure from an exact SVD (allowed by §4.4): randomized PCA (Halko, Martinsson, Tropp) with
    k + 10 columns, capped at min(M', D); when the cap is reached the range finder spans the whole
    row or column space and the result equals the exact SVD up to rounding. The pool is
    subsampled before the LayerNorm (LN is per row, so this is the reference's pool, made cheaper).
    Both implementations run this same PyTorch code.
    """
    check_tensor("pos_hidden", pos_hidden, 2, FLOAT_DTYPES)
    rank = _check_int("rank", rank, 1)
    max_tokens = _check_int("max_tokens", max_tokens, 2)
    niter = _check_int("niter", niter, 0)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    m, d = pos_hidden.shape
    if d < 1:
        raise ValueError(f"pos_hidden has D={d} columns; need D >= 1")
    if min(m, max_tokens) < 2:
        raise ValueError(f"pos_hidden has M={m} rows; the pool needs at least 2 tokens to have a basis")
    # Validates RESRL_KERNEL_IMPL; both implementations share the code below.
    select_impl(pos_hidden.device)
    if value_checks_enabled():
        raise_if_any({"pos_hidden contains NaN or Inf": ~torch.isfinite(pos_hidden).all()})

    idx = subsample_indices(m, max_tokens, generator)
    if idx is not None:
        pos_hidden = pos_hidden[idx.to(pos_hidden.device)]
    pool_MD = F.layer_norm(pos_hidden.float(), (d,), eps=LN_EPS)
    mean_D = pool_MD.mean(0)
    a_MD = pool_MD - mean_D
    m_pool = a_MD.shape[0]
    k = min(rank, m_pool - 1, d)
    width = min(k + OVERSAMPLE, m_pool, d)

    omega_DL = torch.randn(d, width, generator=generator, dtype=torch.float32).to(a_MD.device)
    q_ML = torch.linalg.qr(a_MD @ omega_DL).Q
    for _ in range(niter):
        q_DL = torch.linalg.qr(a_MD.T @ q_ML).Q
        q_ML = torch.linalg.qr(a_MD @ q_DL).Q
    b_LD = q_ML.T @ a_MD
    _, s_L, vh_LD = torch.linalg.svd(b_LD, full_matrices=False)
    k = min(k, numerical_rank(s_L, m_pool, d))
    return vh_LD[:k].T.contiguous(), mean_D


# --------------------------------------------------------------------------- subspace_residual


@triton.jit
def _residual_kernel(
    h_ptr,  # [N, D] any float dtype, row stride stride_hn
    order_ptr,  # [N] int32 token ids sorted by group
    prog_group_ptr,  # [P] int32 group of each program
    prog_start_ptr,  # [P] int32 first sorted position of each program
    prog_end_ptr,  # [P] int32 end (exclusive) of that group's sorted segment; start >= end: idle
    basis_ptr,  # [G, D, K] fp32 contiguous
    mean_ptr,  # [G, D] fp32 contiguous
    out_ptr,  # [N] fp32 in the original token order
    D,
    K,
    stride_hn,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(prog_start_ptr + pid)
    end = tl.load(prog_end_ptr + pid)
    if start >= end:
        return
    g = tl.load(prog_group_ptr + pid).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_N)
    row_mask = pos < end
    tok = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    row_ptr = h_ptr + tok[:, None] * stride_hn  # [BLOCK_N, 1]

    # Pass 1: LayerNorm statistics by Chan's pairwise merge of per-chunk (mean, M2), which stays
    # accurate when |mean| >> std, unlike E[x^2] - E[x]^2.
    mean = tl.zeros([BLOCK_N], tl.float32)
    m2 = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(row_ptr + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        n_a = d0 * 1.0
        n_b = tl.minimum(D - d0, BLOCK_D) * 1.0
        mean_b = tl.sum(x, axis=1) / n_b
        xc = tl.where(d_mask[None, :], x - mean_b[:, None], 0.0)
        m2_b = tl.sum(xc * xc, axis=1)
        delta = mean_b - mean
        n_ab = n_a + n_b
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
    rstd = 1.0 / tl.sqrt(m2 / D + 1e-5)

    # Pass 2: z = LN(h) - mu_g; ||z||^2 and z V_g, fp32 operands and IEEE dots: the distance is a
    # difference of two nearly equal squares, so TF32/bf16 rounding of z or V would dominate it.
    # The basis columns are taken BLOCK_K at a time, z recomputed for each slice (the rows come
    # from L2), so registers stay bounded at any rank: a [BLOCK_N, k] accumulator for the whole
    # rank spilled above k = 64 on sm_90.
    offs_k = tl.arange(0, BLOCK_K)
    basis_g = basis_ptr + g * D * K
    mean_g = mean_ptr + g * D
    sq = tl.zeros([BLOCK_N], tl.float32)
    proj_sq = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        sq_k = tl.zeros([BLOCK_N], tl.float32)
        proj = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = tl.load(row_ptr + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            mu = tl.load(mean_g + offs_d, mask=d_mask, other=0.0)
            z = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] - mu[None, :]
            z = tl.where(d_mask[None, :], z, 0.0)  # [BLOCK_N, BLOCK_D]
            sq_k += tl.sum(z * z, axis=1)
            v = tl.load(
                basis_g + offs_d[:, None] * K + (k0 + offs_k)[None, :],
                mask=d_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BLOCK_D, BLOCK_K]
            proj = tl.dot(z, v, proj, input_precision="ieee")
        # Every slice computes the same ||z||^2; keeping the last one avoids a branch.
        sq = sq_k
        proj_sq += tl.sum(proj * proj, axis=1)
    dist = tl.maximum(sq - proj_sq, 0.0) / D
    tl.store(out_ptr + tok, dist, mask=row_mask)


def _residual_tiles(k: int) -> tuple[int, int, int, dict]:
    """(BLOCK_N, BLOCK_D, BLOCK_K, launch options) for rank k; tl.dot needs every tile side >= 16.

    BLOCK_K is the basis slice of one pass; ranks above it loop over slices, so registers do not
    grow with the rank. Chosen from sm_90 compiles (`python -m kernels._aot`, triton 3.6 to 3.9):
    [64, 32] row tiles in one stage compile without spills at ranks 1 to 256 in fp32, bf16 and
    fp16 (at most 128 registers: four blocks per SM hide the load latency that stages would).
    Ranks below 64 use the same slice: the kernel is bound by reading the rows, and BLOCK_K = 16
    spilled 8 bytes in fp32 with triton 3.8. `_residual_triton` pads k to a multiple of 16.
    Spills seen otherwise: a whole-rank accumulator (BLOCK_K = 128) kilobytes; BLOCK_K = 32 with
    triton 3.9 fell to 32 registers and kilobytes of local memory; two or three stages spilled
    8 to 40 bytes at some ranks with 3.6 or 3.9; triton 3.2 spills 8 to 16 bytes even here.
    """
    if interpreting():
        # Slices of 16 so that CPU tests with ranks above 16 run the multi-slice loop.
        return 16, 32, 16, {}
    return 64, 32, 64, {"num_warps": 4, "num_stages": 1}


def _block_table(
    group_N: torch.Tensor | None, n: int, g: int, block_n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sorted token order and per-program (group, start, end), built on the device without a sync.

    The grid is an upper bound, cdiv(N, BLOCK_N) + min(G, N) programs (each non-empty group wastes
    under one block); programs past the real block count get start = end and exit at once.
    """
    if group_N is None or g == 1:
        order = torch.arange(n, device=device, dtype=torch.int32)
        counts_G = torch.full((1,), n, device=device, dtype=torch.int64)
        g = 1
    else:
        order = torch.argsort(group_N, stable=True).to(torch.int32)
        counts_G = torch.zeros(g, device=device, dtype=torch.int64)
        counts_G.scatter_add_(0, group_N, torch.ones_like(group_N))
    blocks_G = (counts_G + block_n - 1) // block_n
    block_end_G = torch.cumsum(blocks_G, 0)
    seg_end_G = torch.cumsum(counts_G, 0)
    seg_start_G = seg_end_G - counts_G
    programs = triton.cdiv(n, block_n) + min(g, n)
    pid_P = torch.arange(programs, device=device, dtype=torch.int64)
    grp_P = torch.searchsorted(block_end_G, pid_P, right=True)
    live_P = grp_P < g
    grp_P = grp_P.clamp_max(g - 1)
    block_in_group_P = pid_P - (block_end_G[grp_P] - blocks_G[grp_P])
    start_P = seg_start_G[grp_P] + block_in_group_P * block_n
    end_P = torch.where(live_P, seg_end_G[grp_P], start_P)
    i32 = torch.int32
    return order, grp_P.to(i32), start_P.to(i32), end_P.to(i32), programs


def _residual_triton(
    hidden_ND: torch.Tensor, basis_GDK: torch.Tensor, mean_GD: torch.Tensor, group_N: torch.Tensor | None
) -> torch.Tensor:
    n, d = hidden_ND.shape
    g, _, k = basis_GDK.shape
    if hidden_ND.stride(1) != 1:
        hidden_ND = hidden_ND.contiguous()
    if k == 0 or k % 16:
        # Zero columns up to a multiple of 16 leave the distances unchanged (k = 0, no subspace,
        # included: no empty-tensor pointer) and give one compiled variant for every rank; with
        # k = 1 or k not a multiple of 16, ptxas 13 spilled 8 bytes in some variants.
        basis_GDK = F.pad(basis_GDK, (0, 16 - k % 16))
        k = basis_GDK.shape[2]
    block_n, block_d, block_k, launch = _residual_tiles(k)
    order, grp, start, end, programs = _block_table(group_N, n, g, block_n, hidden_ND.device)
    dist_N = torch.empty(n, dtype=torch.float32, device=hidden_ND.device)
    _residual_kernel[(programs,)](
        hidden_ND, order, grp, start, end, basis_GDK, mean_GD, dist_N, d, k, hidden_ND.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    return dist_N


def _residual_torch(
    hidden_ND: torch.Tensor, basis_GDK: torch.Tensor, mean_GD: torch.Tensor, group_N: torch.Tensor | None
) -> torch.Tensor:
    """Same math in token chunks: one GEMM for a single group, else a per-token gathered basis."""
    n, d = hidden_ND.shape
    g, _, k = basis_GDK.shape
    single = group_N is None or g == 1
    per_token = 4 * d * (1 + (0 if single else k))
    step = max(1, min(n, TORCH_CHUNK_BYTES // per_token))
    dist_N = torch.empty(n, dtype=torch.float32, device=hidden_ND.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        ln_CD = F.layer_norm(hidden_ND[s:e].float(), (d,), eps=LN_EPS)
        if single:
            z_CD = ln_CD - mean_GD[0]
            proj_CK = z_CD @ basis_GDK[0]
        else:
            grp_C = group_N[s:e]
            z_CD = ln_CD - mean_GD.index_select(0, grp_C)
            proj_CK = torch.einsum("cd,cdk->ck", z_CD, basis_GDK.index_select(0, grp_C))
        resid = (z_CD * z_CD).sum(1) - (proj_CK * proj_CK).sum(1)
        dist_N[s:e] = resid.clamp_min(0.0) / d
    return dist_N


def subspace_residual(
    hidden: torch.Tensor,
    basis: torch.Tensor,
    mean: torch.Tensor,
    group_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared distance of each token from its group's positive subspace: dist [N] fp32.

    dist = ||(I - V V^T)(LN(h) - mu)||^2 / D = (||z||^2 - ||V^T z||^2) / D with z = LN(h) - mu,
    LN parameter-free in fp32 (eps 1e-5, biased variance), V = basis of the token's group.

    Args:
        hidden: [N, D] fp32/bf16/fp16 (detached hidden states; N may be 0 or 1).
        basis: [G, D, k] per-group bases or [D, k] for a single group, any float dtype (used in
            fp32). Columns must be orthonormal or zero: zero-padded columns let groups with a
            smaller k be stacked. k = 0 is allowed (dist = ||z||^2 / D).
        mean: [G, D] (with a 3-D basis) or [D] (with a 2-D basis): the pool means mu.
        group_index: [N] int64/int32 group of each token in [0, G); None means every token is in
            group 0 (only allowed when there is one group).

    Returns:
        dist [N] fp32, clamped at 0 (the identity above can go a rounding error below 0).

    Departure from the explicit projection in the reference: the orthonormal-basis identity
    ||z||^2 - ||V^T z||^2 saves a second pass; everything is accumulated in fp32 with IEEE dots.
    """
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("basis", basis, (2, 3), FLOAT_DTYPES + (torch.float64,))
    check_tensor("mean", mean, (1, 2), FLOAT_DTYPES + (torch.float64,))
    if group_index is not None:
        check_tensor("group_index", group_index, 1, INDEX_DTYPES)
    check_same_device(hidden=hidden, basis=basis, mean=mean, group_index=group_index)
    n, d = hidden.shape
    if basis.dim() == 2:
        if mean.dim() != 1:
            raise ValueError(f"basis is [D, k] (one group) so mean must be [D]; got mean {tuple(mean.shape)}")
        basis, mean = basis.unsqueeze(0), mean.unsqueeze(0)
    elif mean.dim() != 2:
        raise ValueError(f"basis is [G, D, k] so mean must be [G, D]; got mean {tuple(mean.shape)}")
    g, db, k = basis.shape
    if d < 1:
        raise ValueError(f"hidden has D={d} columns; need D >= 1")
    if db != d:
        raise ValueError(f"hidden is [N={n}, D={d}] but basis has D={db}: the hidden sizes must match")
    if tuple(mean.shape) != (g, d):
        raise ValueError(f"mean has shape {tuple(mean.shape)}; expected [G={g}, D={d}] to match basis")
    if g < 1:
        raise ValueError("basis has G=0 groups; need at least one")
    if group_index is None:
        if g != 1:
            raise ValueError(f"group_index is required when basis has G={g} > 1 groups")
    elif group_index.shape[0] != n:
        raise ValueError(f"group_index has {group_index.shape[0]} entries but hidden has N={n} rows")
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    if value_checks_enabled():
        checks = {
            "hidden contains NaN or Inf": ~torch.isfinite(hidden).all(),
            "basis contains NaN or Inf": ~torch.isfinite(basis).all(),
            "mean contains NaN or Inf": ~torch.isfinite(mean).all(),
        }
        if group_index is not None:
            checks[f"group_index has entries outside [0, G={g})"] = (
                (group_index < 0) | (group_index >= g)
            ).any()
        raise_if_any(checks)
    group_N = None if group_index is None else group_index.long().contiguous()
    impl = select_impl(hidden.device)
    return subspace_residual_op(hidden, basis.float().contiguous(), mean.float().contiguous(), group_N, impl)


# Custom op over both paths (`impl` chosen by the public function), so torch.compile and fake
# tensors trace through it; nothing here is differentiable, so no autograd is registered.
@torch.library.custom_op("resrl::subspace_residual", mutates_args=())
def subspace_residual_op(
    hidden: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, group_index: torch.Tensor | None, impl: str
) -> torch.Tensor:
    if impl == "torch":
        return _residual_torch(hidden, basis, mean, group_index)
    return _residual_triton(hidden, basis, mean, group_index)


@subspace_residual_op.register_fake
def _(hidden, basis, mean, group_index, impl):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


# --------------------------------------------------------------------------- residual_weights


@triton.jit
def _weights_kernel(
    dist_ptr,  # [N] fp32
    seg_ptr,  # [N] int64 dense group id of each token
    valid_ptr,  # [N] uint8
    lo_ptr,  # [S] fp32 low quantile per dense group
    span_ptr,  # [S] fp32 high - low quantile, 0 where the group is flat
    out_ptr,  # [N] fp32
    N,
    min_weight,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    valid = tl.load(valid_ptr + offs, mask=mask, other=0) != 0
    use = mask & valid
    d = tl.load(dist_ptr + offs, mask=use, other=0.0)
    seg = tl.load(seg_ptr + offs, mask=use, other=0)
    lo = tl.load(lo_ptr + seg, mask=use, other=0.0)
    span = tl.load(span_ptr + seg, mask=use, other=1.0)
    flat = span == 0.0
    t = (d - lo) / tl.where(flat, 1.0, span)
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    w = tl.where(flat, (1.0 + min_weight) * 0.5, min_weight + (1.0 - min_weight) * t)
    w = tl.where(valid, tl.minimum(w, 1.0), 1.0)
    tl.store(out_ptr + offs, w, mask=mask)


def _group_quantiles(
    dist_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, q_low: float, q_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token dense group id [N] and per-dense-group (low quantile, spread) [N], float64 math.

    One lexicographic sort by (group, invalid last, dist) via two stable sorts; groups get dense
    ids from the sorted segment boundaries, so any integer ids work and no count leaves the device.
    Quantiles interpolate linearly at q (n_g - 1), as torch.quantile does.
    """
    n = dist_N.shape[0]
    device = dist_N.device
    key_N = torch.where(valid_N, dist_N.double(), torch.inf)
    by_dist = torch.argsort(key_N, stable=True)
    order = by_dist[torch.argsort(group_N[by_dist], stable=True)]
    grp_sorted = group_N[order]
    new_seg = torch.ones(n, dtype=torch.bool, device=device)
    new_seg[1:] = grp_sorted[1:] != grp_sorted[:-1]
    seg_sorted = torch.cumsum(new_seg, 0) - 1  # [N] dense ids in [0, S)
    positions = torch.arange(n, device=device)
    seg_start_S = torch.full((n,), n, dtype=torch.int64, device=device)
    seg_start_S.scatter_reduce_(0, seg_sorted, positions, reduce="amin")
    n_valid_S = torch.zeros(n, dtype=torch.int64, device=device)
    n_valid_S.scatter_add_(0, seg_sorted, valid_N[order].long())
    key_sorted = key_N[order]
    last_S = (n_valid_S - 1).clamp_min(0).double()

    def quantile(q: float) -> torch.Tensor:
        pos_S = q * last_S
        below_S = pos_S.floor()
        frac_S = pos_S - below_S
        lo_idx = (seg_start_S + below_S.long()).clamp(0, n - 1)
        hi_idx = (seg_start_S + pos_S.ceil().long()).clamp(0, n - 1)
        return torch.lerp(key_sorted[lo_idx], key_sorted[hi_idx], frac_S)

    lo_S = quantile(q_low)
    spread_S = quantile(q_high) - lo_S
    # Groups without valid tokens (inf keys) produce NaN here; only invalid tokens point at them.
    seg_N = torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)
    return seg_N, lo_S, spread_S


def residual_weights(
    dist: torch.Tensor,
    group_index: torch.Tensor,
    valid: torch.Tensor,
    *,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_weight: float = 0.1,
) -> torch.Tensor:
    """Per-group quantile normalization of residual distances (ALGORITHMS.md §4.6): weight [N] fp32.

    For each group over its valid tokens: q_lo, q_hi = quantiles of dist (linear interpolation, as
    torch.quantile); w = min_weight + (1 - min_weight) clip((d - q_lo) / (q_hi - q_lo), 0, 1), or
    (1 + min_weight) / 2 for every token of a group whose q_hi - q_lo < 1e-5. Invalid tokens get 1;
    w never exceeds 1.

    Args:
        dist: [N] float distances (from `subspace_residual`); must be finite where valid.
        group_index: [N] int64/int32 group ids; any integers, need not be dense.
        valid: [N] bool, the tokens that take part (valid tokens of negative responses of
            groups that have a basis).
        q_low, q_high: quantile levels, 0 <= q_low < q_high <= 1.
        min_weight: xi in [0, 1], the weight of the most on-subspace tokens.

    The quantiles come from one sort in PyTorch on both paths (no loop over groups, no host sync);
    the Triton path fuses the per-token gather and normalization into one kernel.
    """
    check_tensor("dist", dist, 1, DIST_DTYPES)
    check_tensor("group_index", group_index, 1, INDEX_DTYPES)
    check_tensor("valid", valid, 1, (torch.bool,))
    check_same_device(dist=dist, group_index=group_index, valid=valid)
    n = dist.shape[0]
    if group_index.shape[0] != n or valid.shape[0] != n:
        raise ValueError(
            f"dist, group_index and valid must have one entry per token; got lengths "
            f"{n}, {group_index.shape[0]}, {valid.shape[0]}"
        )
    q_low, q_high, min_weight = float(q_low), float(q_high), float(min_weight)
    if not (0.0 <= q_low < q_high <= 1.0):
        raise ValueError(f"quantile levels need 0 <= q_low < q_high <= 1; got q_low={q_low}, q_high={q_high}")
    if not (0.0 <= min_weight <= 1.0):
        raise ValueError(f"min_weight must be in [0, 1], got {min_weight}")
    if n == 0:
        return torch.ones(0, dtype=torch.float32, device=dist.device)
    if value_checks_enabled():
        raise_if_any({"dist contains NaN or Inf at valid tokens": (valid & ~torch.isfinite(dist)).any()})
    impl = select_impl(dist.device)
    return residual_weights_op(dist, group_index.long(), valid, q_low, q_high, min_weight, impl)


@torch.library.custom_op("resrl::residual_weights", mutates_args=())
def residual_weights_op(
    dist: torch.Tensor,
    group_index: torch.Tensor,
    valid: torch.Tensor,
    q_low: float,
    q_high: float,
    min_weight: float,
    impl: str,
) -> torch.Tensor:
    seg_N, lo_S, spread_S = _group_quantiles(dist, group_index, valid, q_low, q_high)
    if impl == "torch":
        lo_N, spread_N = lo_S[seg_N], spread_S[seg_N]
        d_N = dist.double()
        t_N = ((d_N - lo_N) / spread_N).clamp(0.0, 1.0)
        w_N = torch.where(
            spread_N < FLAT_SPREAD, (1.0 + min_weight) / 2, min_weight + (1.0 - min_weight) * t_N
        )
        return torch.where(valid, w_N.clamp_max(1.0), 1.0).float()
    span_S = torch.where(spread_S < FLAT_SPREAD, 0.0, spread_S).float()
    return _weights_triton(dist.float().contiguous(), seg_N, valid, lo_S.float(), span_S, min_weight)


@residual_weights_op.register_fake
def _(dist, group_index, valid, q_low, q_high, min_weight, impl):
    return dist.new_empty(dist.shape[0], dtype=torch.float32)


def _weights_triton(
    dist_N: torch.Tensor,
    seg_N: torch.Tensor,
    valid_N: torch.Tensor,
    lo_S: torch.Tensor,
    span_S: torch.Tensor,
    min_weight: float,
) -> torch.Tensor:
    """Launch the per-token normalize kernel: weight [N] fp32 (span 0 marks a flat group)."""
    n = dist_N.shape[0]
    out_N = torch.empty(n, dtype=torch.float32, device=dist_N.device)
    block = 1024 if not interpreting() else 64
    _weights_kernel[(triton.cdiv(n, block),)](
        dist_N, seg_N, valid_N.view(torch.uint8).contiguous(), lo_S, span_S, out_N, n, min_weight,
        BLOCK=block,
    )  # fmt: skip
    return out_N
