"""Pure-PyTorch `linear_logprob`: token-chunked, O(chunk·V) memory, recompute in the backward.

The CPU fallback and the `RESRL_KERNEL_IMPL=torch` path, as host functions beside the Triton ones
(`kernels.linear_logprob` registers both behind one torch custom op). Each chunk of tokens
materializes its [chunk, V] logits in fp32, reduces them to log-prob / log-sum-exp / entropy, and
drops them; the backward recomputes them chunk by chunk and accumulates the weight gradient in fp32.
An optional second part (hidden2 [N, D2], weight2 [V, D2]) adds h2·W2ᵀ to each chunk's logits;
no [V, D+D2] weight is formed.
"""

from __future__ import annotations

import torch

# fp32 logits of one token chunk stay under this many bytes (two such buffers live at once).
CHUNK_BYTES = 16 * 2**20


def chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (4 * max(v, 1))))


def chunked_forward(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    hidden2_ND2: torch.Tensor | None = None,
    weight2_VD2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprob [N], lse [N], entropy [N] or None), fp32, one token chunk of logits at a time.

    With a second part the chunk's logits are h·Wᵀ + h2·W2ᵀ (the second product added in place
    into the same fp32 buffer, before the temperature)."""
    n, v = hidden_ND.shape[0], weight_VD.shape[0]
    weight_f32 = weight_VD.float()
    weight2_f32 = None if weight2_VD2 is None else weight2_VD2.float()
    logprob_N = torch.empty(n, dtype=torch.float32, device=hidden_ND.device)
    lse_N = torch.empty_like(logprob_N)
    entropy_N = torch.empty_like(logprob_N) if return_entropy else None
    step = chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = hidden_ND[s:e].float() @ weight_f32.T  # [C, V]
        if weight2_f32 is not None:
            logits.addmm_(hidden2_ND2[s:e].float(), weight2_f32.T)
        logits /= temperature
        lse = torch.logsumexp(logits, dim=-1)
        lse_N[s:e] = lse
        logprob_N[s:e] = logits.gather(1, target_N[s:e, None]).squeeze(1) - lse
        if return_entropy:
            # H = lse - sum_j p_j z_j, with p_j z_j formed in place of the logits
            p = torch.exp(logits - lse[:, None])
            entropy_N[s:e] = lse - p.mul_(logits).sum(-1)
    return logprob_N, lse_N, entropy_N


def chunked_backward(
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
    """(grad_hidden, grad_weight) in the input dtypes, logits recomputed chunk by chunk; with a
    second part (grad_hidden, grad_weight, grad_hidden2, grad_weight2). None where not needed:
    each gradient's matmul runs only when asked for.

    `grad_entropy_N` None means no entropy term (then `entropy_N` is not read)."""
    n, v = hidden_ND.shape[0], weight_VD.shape[0]
    two_part = hidden2_ND2 is not None
    need_hidden2 = two_part and need_hidden2
    need_weight2 = two_part and need_weight2
    weight_f32 = weight_VD.float()
    weight2_f32 = weight2_VD2.float() if two_part else None
    use_entropy = grad_entropy_N is not None
    grad_h = torch.empty_like(hidden_ND) if need_hidden else None
    grad_w_f32 = torch.zeros_like(weight_f32) if need_weight else None
    grad_h2 = torch.empty_like(hidden2_ND2) if need_hidden2 else None
    grad_w2_f32 = torch.zeros_like(weight2_f32) if need_weight2 else None
    step = chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden_ND[s:e].float()
        h2 = hidden2_ND2[s:e].float() if two_part else None
        # Two [C, V] buffers: log p (later the entropy term) and p (later dz).
        logp = h @ weight_f32.T  # [C, V]
        if two_part:
            logp.addmm_(h2, weight2_f32.T)
        logp /= temperature
        logp -= lse_N[s:e, None]
        dz = torch.exp(logp)
        if use_entropy:
            # d H / d z_j = -p_j (log p_j + H)
            ent_term = logp.add_(entropy_N[s:e, None]).mul_(dz).mul_(grad_entropy_N[s:e, None].float())
        g_lp = grad_logprob_N[s:e, None].float()
        # d logprob / d z_j = 1[j = target] - p_j
        dz.mul_(-g_lp)
        dz.scatter_add_(1, target_N[s:e, None], g_lp)
        if use_entropy:
            dz -= ent_term
        dz /= temperature
        if need_hidden:
            grad_h[s:e] = (dz @ weight_f32).to(hidden_ND.dtype)
        if need_hidden2:
            grad_h2[s:e] = (dz @ weight2_f32).to(hidden2_ND2.dtype)
        if need_weight:
            grad_w_f32.addmm_(dz.T, h)
        if need_weight2:
            grad_w2_f32.addmm_(dz.T, h2)
    grad_w = grad_w_f32.to(weight_VD.dtype) if need_weight else None
    if not two_part:
        return grad_h, grad_w
    grad_w2 = grad_w2_f32.to(weight2_VD2.dtype) if need_weight2 else None
    return grad_h, grad_w, grad_h2, grad_w2
