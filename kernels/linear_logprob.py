"""Fused LM-head log-prob and entropy, never materializing the [N, V] logits.

Forward (one Triton kernel): each program owns BLOCK_N tokens and one slice of the vocabulary; it
computes logits tiles with `tl.dot` and folds them into an online log-sum-exp state (running max
m, Σe^{z-m}, Σe^{z-m}(z-m) for the entropy, and the target logit). The per-slice states, a few
floats per token, are combined on the host. Nothing of size N·V exists.

Backward: the vocabulary is walked in chunks of VC columns. A Triton kernel recomputes a chunk's
logits and writes the logit gradient dz [N, VC] (per-token coefficients from the upstream
gradients of log-prob and entropy, temperature applied); two cuBLAS matmuls then give
grad_hidden += dz @ W_c (accumulated in fp32 across chunks) and grad_weight[c] = dzᵀ @ hidden
(each weight row written once, fp32 accumulation inside the GEMM, never summed in bf16). The
chunk is sized by a byte budget (`RESRL_WORKSPACE_MB`, default 256), so memory is
O(N·D + V·D + N·VC).

An optional second part (hidden2 [N, D2], weight2 [V, D2]: R²PO's rollout head) adds h2·W2ᵀ to
the logits without a [V, D+D2] weight: both kernels run a second K-loop into the same tile
(`TWO_PART`, a constexpr, so the one-part binaries are unchanged), and the backward runs each of
the four gradient GEMMs (dz·W, dz·W2, dzᵀ·h, dzᵀ·h2) only for a tensor that requires grad.

Both paths (this Triton one and `kernels.chunked`) sit behind the torch custom ops
`resrl::linear_logprob` and `resrl::linear_logprob_backward`, with fake implementations and the
autograd formula registered, so `torch.compile` and fake-tensor tracing go through them.
"""

from __future__ import annotations

import os

import torch
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
from kernels.chunked import chunked_backward, chunked_forward


@triton.jit
def _logprob_fwd_kernel(
    h_ptr,
    w_ptr,
    h2_ptr,  # [N, D2] second part (TWO_PART), else None
    w2_ptr,  # [V, D2] second part (TWO_PART), else None
    tgt_ptr,
    part_ptr,  # [4, SPLITS, N] fp32: running max, Σe^{z-m}, Σe^{z-m}(z-m), target logit
    N,
    V,
    D,
    D2,
    v_per_split,
    stride_hn,
    stride_wv,
    stride_h2n,
    stride_w2v,
    inv_t,
    TWO_PART: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    # Element offsets of whole rows reach N*D and V*D, past 2^31 at real shapes: the block's first
    # row goes into a 64-bit scalar base, the offsets inside a tile stay 32-bit (fewer registers).
    local_n = tl.arange(0, BLOCK_N)
    local_v = tl.arange(0, BLOCK_V)
    h_blk = h_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_hn
    if TWO_PART:
        h2_blk = h2_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_h2n

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + local_v
        col_mask = cols < v_end
        w_blk = w_ptr + tl.cast(v0, tl.int64) * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            h = tl.load(
                h_blk + local_n[:, None] * stride_hn + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            w = tl.load(
                w_blk + local_v[:, None] * stride_wv + offs_d[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # [BLOCK_V, BLOCK_D]
            if CAST_F32:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        if TWO_PART:
            # The second K-loop, over (h2, W2), into the same tile: z = (h·Wᵀ + h2·W2ᵀ)/T without
            # a [V, D+D2] weight. Compiled out of the one-part kernel (TWO_PART is a constexpr).
            w2_blk = w2_ptr + tl.cast(v0, tl.int64) * stride_w2v
            for d0 in range(0, D2, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D2
                h2 = tl.load(
                    h2_blk + local_n[:, None] * stride_h2n + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )  # [BLOCK_N, BLOCK_D]
                w2 = tl.load(
                    w2_blk + local_v[:, None] * stride_w2v + offs_d[None, :],
                    mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )  # [BLOCK_V, BLOCK_D]
                if CAST_F32:
                    h2 = h2.to(tl.float32)
                    w2 = w2.to(tl.float32)
                acc = tl.dot(h2, tl.trans(w2), acc, input_precision=PRECISION)
        z = tl.where(col_mask[None, :], acc * inv_t, float("-inf"))  # [BLOCK_N, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # First tile: m = -inf, s = t = 0; keep the rescale finite.
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        zc = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        ez = tl.where(col_mask[None, :], tl.exp(zc), 0.0)
        t = alpha * (t + s * shift) + tl.sum(ez * zc, axis=1)
        s = alpha * s + tl.sum(ez, axis=1)
        is_tgt = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
        tgt_logit += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
        m = m_new

    base = pid_s * N + rows
    stride_q = n_splits * N
    tl.store(part_ptr + base, m, mask=row_mask)
    tl.store(part_ptr + stride_q + base, s, mask=row_mask)
    tl.store(part_ptr + 2 * stride_q + base, t, mask=row_mask)
    tl.store(part_ptr + 3 * stride_q + base, tgt_logit, mask=row_mask)


@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    h2_ptr,  # [N, D2] second part (TWO_PART), else None
    w2_ptr,  # [V, D2] second part (TWO_PART), else None
    tgt_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,  # [N, VC] in the input dtype
    N,
    V,
    D,
    D2,
    v_offset,
    vc,
    stride_hn,
    stride_wv,
    stride_h2n,
    stride_w2v,
    stride_dzn,
    inv_t,
    HAS_ENT: tl.constexpr,
    TWO_PART: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local_n = tl.arange(0, BLOCK_N)
    local_v = tl.arange(0, BLOCK_V)
    rows = pid_n * BLOCK_N + local_n
    row_mask = rows < N
    cols_local = pid_v * BLOCK_V + local_v
    cols = v_offset + cols_local
    col_mask = (cols_local < vc) & (cols < V)
    # 64-bit scalar bases for the first row and column of the block, 32-bit offsets inside it
    # (N*D, V*D and N*VC element offsets can pass 2^31).
    row0 = (pid_n * BLOCK_N).to(tl.int64)
    h_blk = h_ptr + row0 * stride_hn
    w_blk = w_ptr + (v_offset + pid_v * BLOCK_V).to(tl.int64) * stride_wv
    dz_blk = dz_ptr + row0 * stride_dzn + pid_v * BLOCK_V

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(
            h_blk + local_n[:, None] * stride_hn + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_blk + local_v[:, None] * stride_wv + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if CAST_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if TWO_PART:
        # The logits recomputed with the second part, as in the forward.
        h2_blk = h2_ptr + row0 * stride_h2n
        w2_blk = w2_ptr + (v_offset + pid_v * BLOCK_V).to(tl.int64) * stride_w2v
        for d0 in range(0, D2, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D2
            h2 = tl.load(
                h2_blk + local_n[:, None] * stride_h2n + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            w2 = tl.load(
                w2_blk + local_v[:, None] * stride_w2v + offs_d[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if CAST_F32:
                h2 = h2.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc = tl.dot(h2, tl.trans(w2), acc, input_precision=PRECISION)

    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    logp = acc * inv_t - lse[:, None]
    p = tl.exp(logp)
    # d logprob / d z_j = 1[j = target] - p_j
    dz = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        # d H / d z_j = -p_j (log p_j + H)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_t
    tl.store(
        dz_blk + local_n[:, None] * stride_dzn + local_v[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _tile_config(dtype: torch.dtype, two_part: bool = False) -> dict:
    """Tiles and launch options per input dtype; `launch_fwd` for the forward, `launch` for dlogits.

    Checked for sm_90 by `python -m kernels._aot` (no spills, 16-bit dots on wgmma; triton 3.2
    and 3.6 to 3.9). The 16-bit forward holds the [128, 128] fp32 logits tile and its online-softmax
    temporaries at 255 registers: with three stages triton 3.9 spilled 8 bytes; four stages (128
    KiB of shared memory, one block per SM as the registers already allow) did not.

    The two-part 16-bit forward (a second K-loop in the same kernel) spilled 40 bytes at that
    config with 3, 4 or 5 stages (triton 3.9); with 32-wide K tiles (`BLOCK_D_FWD`) it did not
    spill at 3 to 6 stages, and keeps the [128, 128] tile and four stages (64 KiB of shared
    memory). Its dlogits kernel keeps the one-part config (188 registers, no spill).
    """
    if interpreting():
        return dict(
            BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, CAST_F32=True, PRECISION="ieee", launch={}, launch_fwd={}
        )
    if dtype == torch.float32:
        launch = dict(num_warps=4, num_stages=2)
        return dict(
            BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, CAST_F32=False, PRECISION="ieee", launch=launch, launch_fwd=launch,
        )  # fmt: skip
    cfg = dict(
        BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, CAST_F32=False, PRECISION="tf32",
        launch=dict(num_warps=8, num_stages=3), launch_fwd=dict(num_warps=8, num_stages=4),
    )  # fmt: skip
    if two_part:
        cfg["BLOCK_D_FWD"] = 32
    return cfg


def _kernel_args(cfg: dict, forward: bool) -> tuple[dict, dict]:
    consts = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "CAST_F32", "PRECISION")}
    if forward and "BLOCK_D_FWD" in cfg:
        consts["BLOCK_D"] = cfg["BLOCK_D_FWD"]
    return consts, cfg["launch_fwd" if forward else "launch"]


def _num_splits(n: int, v: int, block_n: int, block_v: int, device: torch.device) -> int:
    """Vocabulary slices per token block: enough programs to fill the GPU, never an empty slice."""
    n_blocks = triton.cdiv(n, block_n)
    v_tiles = triton.cdiv(v, block_v)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one by one; two slices keep the combine path exercised.
        target = 2 * n_blocks
    return max(1, min(v_tiles, triton.cdiv(target, n_blocks)))


def _second_part(
    hidden2_ND2: torch.Tensor | None, weight2_VD2: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None, int | None, int | None, bool]:
    """Kernel arguments of the optional second part: (h2, W2, D2, h2 row stride, W2 row stride, TWO_PART).

    Without one, all five are None, which Triton turns into constexprs, and TWO_PART=False compiles
    the second K-loop out: the one-part kernels keep the runtime parameters and the binaries they
    had before the second part existed (plain 0 ints instead of None changed ptxas's register
    allocation: 8 bytes of spill in the 16-bit forward on sm_90)."""
    if hidden2_ND2 is None:
        return None, None, None, None, None, False
    return hidden2_ND2, weight2_VD2, hidden2_ND2.shape[1], hidden2_ND2.stride(0), weight2_VD2.stride(0), True


def logprob_forward(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    temperature: float,
    hidden2_ND2: torch.Tensor | None = None,
    weight2_VD2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (logprob [N], lse [N], entropy [N]), all fp32.

    With `hidden2_ND2` [N, D2] and `weight2_VD2` [V, D2] (both contiguous, the dtype of hidden) the
    logits are (hidden·weightᵀ + hidden2·weight2ᵀ)/T, summed in the kernel's fp32 tile."""
    n, d = hidden_ND.shape
    v = weight_VD.shape[0]
    h2, w2, d2, stride_h2n, stride_w2v, two_part = _second_part(hidden2_ND2, weight2_VD2)
    cfg = _tile_config(hidden_ND.dtype, two_part)
    consts, launch = _kernel_args(cfg, forward=True)
    splits = _num_splits(n, v, cfg["BLOCK_N"], cfg["BLOCK_V"], hidden_ND.device)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden_ND.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _logprob_fwd_kernel[grid](
        hidden_ND, weight_VD, h2, w2, target_N, part, n, v, d, d2, v_per_split,
        hidden_ND.stride(0), weight_VD.stride(0), stride_h2n, stride_w2v, 1.0 / temperature,
        TWO_PART=two_part, **consts, **launch,
    )  # fmt: skip
    m, s, t, tgt_logit = part.unbind(0)  # each [SPLITS, N]
    m_max = m.max(0).values
    scale = torch.exp(m - m_max)
    shift = m - m_max
    s_tot = (s * scale).sum(0)
    t_tot = (scale * (t + s * shift)).sum(0)
    log_s = torch.log(s_tot)
    lse_N = m_max + log_s
    logprob_N = tgt_logit.sum(0) - lse_N
    entropy_N = log_s - t_tot / s_tot
    return logprob_N, lse_N, entropy_N


def _workspace_bytes() -> int:
    raw = os.environ.get("RESRL_WORKSPACE_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"RESRL_WORKSPACE_MB={raw!r} must be a positive number of MiB") from None
    if mb <= 0:
        raise ValueError(f"RESRL_WORKSPACE_MB={raw!r} must be a positive number of MiB")
    return int(mb * 2**20)


_FP32_ACCUMULATE: dict[str, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, without rounding the product to bf16 first."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    key = acc.device.type
    if _FP32_ACCUMULATE.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ACCUMULATE[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ACCUMULATE[key] = False
    acc.addmm_(a.float(), b.float())


def logprob_backward(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor | None,
    grad_logprob_N: torch.Tensor,
    grad_entropy_N: torch.Tensor | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    hidden2_ND2: torch.Tensor | None = None,
    weight2_VD2: torch.Tensor | None = None,
    need_hidden2: bool = False,
    need_weight2: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients from the upstream gradients of log-prob (and entropy), chunk by chunk over V.

    Returns (grad_hidden, grad_weight), or with a second part (`hidden2_ND2` [N, D2], `weight2_VD2`
    [V, D2]) (grad_hidden, grad_weight, grad_hidden2, grad_weight2); None where not needed. Each
    chunk's dz [N, VC] is recomputed from both parts once, then only the GEMMs of the gradients
    asked for run: grad_h += dz·W_c and grad_h2 += dz·W2_c (fp32 accumulators across chunks),
    grad_W[c] = dzᵀ·h and grad_W2[c] = dzᵀ·h2 (each row written once by a GEMM over all N).
    """
    n, d = hidden_ND.shape
    v = weight_VD.shape[0]
    h2, w2, d2, stride_h2n, stride_w2v, two_part = _second_part(hidden2_ND2, weight2_VD2)
    need_hidden2 = two_part and need_hidden2
    need_weight2 = two_part and need_weight2
    cfg = _tile_config(hidden_ND.dtype, two_part)
    consts, launch = _kernel_args(cfg, forward=False)
    block_v = cfg["BLOCK_V"]
    bytes_per_col = n * hidden_ND.element_size()
    vc = max(block_v, (_workspace_bytes() // bytes_per_col) // block_v * block_v)
    vc = min(vc, triton.cdiv(v, block_v) * block_v)
    device = hidden_ND.device
    dz = torch.empty(n, vc, dtype=hidden_ND.dtype, device=device)
    grad_h_f32 = torch.zeros(n, d, dtype=torch.float32, device=device) if need_hidden else None
    grad_w = torch.empty_like(weight_VD) if need_weight else None
    grad_h2_f32 = torch.zeros(n, d2, dtype=torch.float32, device=device) if need_hidden2 else None
    grad_w2 = torch.empty_like(weight2_VD2) if need_weight2 else None
    has_ent = grad_entropy_N is not None
    ent = entropy_N if has_ent else lse_N
    g_ent = grad_entropy_N if has_ent else lse_N
    for v0 in range(0, v, vc):
        width = min(vc, v - v0)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(width, block_v))
        _dlogits_kernel[grid](
            hidden_ND, weight_VD, h2, w2, target_N, lse_N, ent, grad_logprob_N, g_ent, dz,
            n, v, d, d2, v0, width, hidden_ND.stride(0), weight_VD.stride(0), stride_h2n, stride_w2v,
            dz.stride(0), 1.0 / temperature, HAS_ENT=has_ent, TWO_PART=two_part, **consts, **launch,
        )  # fmt: skip
        dz_c = dz[:, :width]
        if need_hidden:
            _accumulate_mm(grad_h_f32, dz_c, weight_VD[v0 : v0 + width])
        if need_hidden2:
            _accumulate_mm(grad_h2_f32, dz_c, weight2_VD2[v0 : v0 + width])
        if need_weight:
            torch.mm(dz_c.T, hidden_ND, out=grad_w[v0 : v0 + width])
        if need_weight2:
            torch.mm(dz_c.T, hidden2_ND2, out=grad_w2[v0 : v0 + width])
    grad_h = grad_h_f32.to(hidden_ND.dtype) if need_hidden else None
    if not two_part:
        return grad_h, grad_w
    grad_h2 = grad_h2_f32.to(hidden2_ND2.dtype) if need_hidden2 else None
    return grad_h, grad_w, grad_h2, grad_w2


# The custom ops: the autograd and tracing layer over both paths. `impl` ("triton" or "torch") is
# chosen by the public function and passed in, so a traced graph records which path it runs.
# Outputs of the forward: logprob [N], lse [N] (kept for the backward) and entropy ([N], or [0]
# when not asked for), all fp32. The optional second part (hidden2 [N, D2], weight2 [V, D2]) comes
# last with a default, so one-part calls keep their form. Custom ops cannot return None: the
# backward op returns four tensors, [0] for each gradient not asked for, and the autograd formula
# turns those into None.


@torch.library.custom_op("resrl::linear_logprob", mutates_args=())
def linear_logprob_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    impl: str,
    hidden2: torch.Tensor | None = None,
    weight2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "torch":
        logprob_N, lse_N, entropy_N = chunked_forward(
            hidden, weight, target, temperature, return_entropy, hidden2, weight2
        )
    else:
        logprob_N, lse_N, entropy_N = logprob_forward(hidden, weight, target, temperature, hidden2, weight2)
    if not return_entropy:
        entropy_N = lse_N.new_empty(0)
    return logprob_N, lse_N, entropy_N


@linear_logprob_op.register_fake
def _(hidden, weight, target, temperature, return_entropy, impl, hidden2=None, weight2=None):
    n = hidden.shape[0]
    logprob_N = hidden.new_empty(n, dtype=torch.float32)
    return (
        logprob_N,
        torch.empty_like(logprob_N),
        hidden.new_empty(n if return_entropy else 0, dtype=torch.float32),
    )


@torch.library.custom_op("resrl::linear_logprob_backward", mutates_args=())
def linear_logprob_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    impl: str,
    hidden2: torch.Tensor | None = None,
    weight2: torch.Tensor | None = None,
    need_hidden2: bool = False,
    need_weight2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = chunked_backward if impl == "torch" else logprob_backward
    grads = backward(
        hidden, weight, target, lse, entropy, grad_logprob, grad_entropy, temperature,
        need_hidden, need_weight, hidden2, weight2, need_hidden2, need_weight2,
    )  # fmt: skip
    if hidden2 is None:  # the one-part host functions return (grad_hidden, grad_weight)
        grads = (*grads, None, None)
    # Outputs must not alias one another: a fresh [0] for each gradient not computed.
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_logprob_backward_op.register_fake
def _(
    hidden,
    weight,
    target,
    lse,
    entropy,
    grad_logprob,
    grad_entropy,
    temperature,
    need_hidden,
    need_weight,
    impl,
    hidden2=None,
    weight2=None,
    need_hidden2=False,
    need_weight2=False,
):
    two_part = hidden2 is not None
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        hidden.new_empty(hidden2.shape if two_part and need_hidden2 else (0,)),
        hidden.new_empty(weight2.shape if two_part and need_weight2 else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, temperature, return_entropy, impl, hidden2, weight2 = inputs
    _, lse_N, entropy_N = output
    ctx.save_for_backward(hidden, weight, target, lse_N, entropy_N, hidden2, weight2)
    ctx.temperature, ctx.return_entropy, ctx.impl = temperature, return_entropy, impl


def _backward(ctx, grad_logprob_N, grad_lse_N, grad_entropy_N):
    # grad_lse_N is ignored: lse is an internal output the public function never returns.
    hidden, weight, target, lse_N, entropy_N, hidden2, weight2 = ctx.saved_tensors
    # Inputs: hidden, weight, target, temperature, return_entropy, impl, hidden2, weight2. A
    # gradient not needed (a detached trunk or LM head, as in R²PO's stage A) costs no GEMM. The
    # dispatcher drops trailing arguments equal to their defaults, so a one-part call has six.
    n_inputs = len(ctx.needs_input_grad)
    need = (*ctx.needs_input_grad, False, False)
    need_hidden, need_weight, need_hidden2, need_weight2 = need[0], need[1], need[6], need[7]
    if grad_logprob_N is None:
        grad_logprob_N = torch.zeros_like(lse_N)
    if not ctx.return_entropy:
        grad_entropy_N = None
    second = () if hidden2 is None else (hidden2, weight2, need_hidden2, need_weight2)
    grad_h, grad_w, grad_h2, grad_w2 = linear_logprob_backward_op(
        hidden, weight, target, lse_N, entropy_N, grad_logprob_N.float().contiguous(),
        None if grad_entropy_N is None else grad_entropy_N.float().contiguous(),
        ctx.temperature, need_hidden, need_weight, ctx.impl, *second,
    )  # fmt: skip
    grads = (
        grad_h if need_hidden else None,
        grad_w if need_weight else None,
        None,
        None,
        None,
        None,
        grad_h2 if need_hidden2 else None,
        grad_w2 if need_weight2 else None,
    )
    return grads[:n_inputs]


linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


def _check_second_part(hidden: torch.Tensor, weight: torch.Tensor, hidden2: object, weight2: object) -> None:
    """The optional second part: both or neither, 2-D, the dtype of hidden, N and V matching, one D2.

    Every violation is a one-line ValueError naming the argument and what it accepts."""
    if (hidden2 is None) != (weight2 is None):
        given, missing = ("hidden2", "weight2") if weight2 is None else ("weight2", "hidden2")
        raise ValueError(f"{given} was given without {missing}: pass both (a second part) or neither")
    n, v = hidden.shape[0], weight.shape[0]
    for name, t, rows, what in (("hidden2", hidden2, n, "N"), ("weight2", weight2, v, "V")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have 2 dims, got shape {tuple(t.shape)}")
        if t.dtype != hidden.dtype:
            dtype, want = (str(x).replace("torch.", "") for x in (t.dtype, hidden.dtype))
            raise ValueError(f"{name} has dtype {dtype}; accepted: {want} (the dtype of hidden and weight)")
        if t.shape[0] != rows:
            base = "hidden" if name == "hidden2" else "weight"
            raise ValueError(f"{name} has {t.shape[0]} rows but {base} has {what}={rows}: {what} must match")
    if hidden2.shape[1] != weight2.shape[1]:
        raise ValueError(
            f"hidden2 is [N={n}, D2={hidden2.shape[1]}] but weight2 is [V={v}, D2={weight2.shape[1]}]: "
            "D2 must match"
        )


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    hidden2: torch.Tensor | None = None,
    weight2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-softmax of `(hidden @ weight.T + hidden2 @ weight2.T) / temperature` at `target`, and
    optionally its entropy.

    Args:
        hidden: [N, D] fp32, bf16 or fp16 (final hidden states; any N, including 1).
        weight: [V, D], same dtype and device as `hidden` (the LM head; tied embeddings are fine).
        target: [N] int64 (int32 accepted) token ids in [0, V).
        temperature: > 0; logits are divided by it (sampling and training alike).
        return_entropy: also return the entropy of each token's distribution.
        hidden2, weight2: an optional second part, [N, D2] and [V, D2] (D2 may differ from D), same
            dtype and device as `hidden`; both or neither. The logits become h·Wᵀ + h2·W2ᵀ, the
            concatenated form [h | h2]·[W | W2]ᵀ without building [V, D+D2] (R²PO's rollout head:
            h2 = ReLU(W1·h), W2 its output layer). None: exactly the one-part computation.

    Returns:
        (logprob [N] fp32, entropy [N] fp32 or None). Differentiable w.r.t. `hidden`, `weight`,
        `hidden2` and `weight2` through both outputs, each gradient's GEMMs run only when that
        tensor requires grad; the [N, V] logits are never materialized.
    """
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 2, FLOAT_DTYPES)
    check_tensor("target", target, 1, (torch.int64, torch.int32))
    if hidden2 is not None or weight2 is not None:
        _check_second_part(hidden, weight, hidden2, weight2)
    check_same_device(hidden=hidden, weight=weight, target=target, hidden2=hidden2, weight2=weight2)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    n, d = hidden.shape
    v, dw = weight.shape
    if d != dw:
        raise ValueError(f"hidden is [N={n}, D={d}] but weight is [V={v}, D={dw}]: D must match")
    if target.shape[0] != n:
        raise ValueError(f"target has {target.shape[0]} entries but hidden has N={n} rows")
    if v == 0:
        raise ValueError("weight has V=0 rows: the vocabulary must not be empty")
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    target = target.long()
    if value_checks_enabled() and n > 0:
        checks = {
            f"target has ids outside the vocabulary [0, {v})": ((target < 0) | (target >= v)).any(),
            "hidden contains NaN or Inf": ~torch.isfinite(hidden).all(),
            "weight contains NaN or Inf": ~torch.isfinite(weight).all(),
        }
        if hidden2 is not None:
            checks["hidden2 contains NaN or Inf"] = ~torch.isfinite(hidden2).all()
            checks["weight2 contains NaN or Inf"] = ~torch.isfinite(weight2).all()
        raise_if_any(checks)
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0 + weight.sum() * 0
        if hidden2 is not None:
            empty = empty + hidden2.sum() * 0 + weight2.sum() * 0
        return empty, (empty.clone() if return_entropy else None)
    impl = select_impl(hidden.device)
    second = () if hidden2 is None else (hidden2.contiguous(), weight2.contiguous())
    logprob_N, _, entropy_N = linear_logprob_op(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), temperature, return_entropy, impl,
        *second,
    )  # fmt: skip
    return logprob_N, (entropy_N if return_entropy else None)
