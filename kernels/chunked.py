"""Pure-PyTorch `linear_logprob`: token-chunked, O(chunk·V) memory, recompute in the backward.

The CPU fallback and the `RESRL_KERNEL_IMPL=torch` path. Each chunk of tokens materializes its
[chunk, V] logits in fp32, reduces them to log-prob / log-sum-exp / entropy, and drops them; the
backward recomputes them chunk by chunk and accumulates the weight gradient in fp32.
"""

from __future__ import annotations

import torch

# fp32 logits of one token chunk stay under this many bytes (two such buffers live at once).
CHUNK_BYTES = 16 * 2**20


def chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (4 * max(v, 1))))


class ChunkedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, target_N, temperature: float, return_entropy: bool):
        n, v = hidden_ND.shape[0], weight_VD.shape[0]
        weight_f32 = weight_VD.float()
        logprob_N = torch.empty(n, dtype=torch.float32, device=hidden_ND.device)
        lse_N = torch.empty_like(logprob_N)
        entropy_N = torch.empty_like(logprob_N) if return_entropy else None
        step = chunk_rows(n, v)
        for s in range(0, n, step):
            e = min(n, s + step)
            logits = hidden_ND[s:e].float() @ weight_f32.T  # [C, V]
            logits /= temperature
            lse = torch.logsumexp(logits, dim=-1)
            lse_N[s:e] = lse
            logprob_N[s:e] = logits.gather(1, target_N[s:e, None]).squeeze(1) - lse
            if return_entropy:
                # H = lse - sum_j p_j z_j, with p_j z_j formed in place of the logits
                p = torch.exp(logits - lse[:, None])
                entropy_N[s:e] = lse - p.mul_(logits).sum(-1)
        ctx.save_for_backward(hidden_ND, weight_VD, target_N, lse_N, entropy_N)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        return logprob_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprob_N, grad_entropy_N):
        hidden_ND, weight_VD, target_N, lse_N, entropy_N = ctx.saved_tensors
        temperature = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = hidden_ND.shape[0], weight_VD.shape[0]
        weight_f32 = weight_VD.float()
        if grad_logprob_N is None:
            grad_logprob_N = torch.zeros_like(lse_N)
        use_entropy = ctx.return_entropy and grad_entropy_N is not None
        grad_h = torch.empty_like(hidden_ND) if need_h else None
        grad_w_f32 = torch.zeros_like(weight_f32) if need_w else None
        step = chunk_rows(n, v)
        for s in range(0, n, step):
            e = min(n, s + step)
            h = hidden_ND[s:e].float()
            # Two [C, V] buffers: log p (later the entropy term) and p (later dz).
            logp = h @ weight_f32.T  # [C, V]
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
            if need_h:
                grad_h[s:e] = (dz @ weight_f32).to(hidden_ND.dtype)
            if need_w:
                grad_w_f32.addmm_(dz.T, h)
        grad_w = grad_w_f32.to(weight_VD.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def linear_logprob_torch(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    temperature: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return ChunkedLinearLogprob.apply(hidden_ND, weight_VD, target_N, temperature, return_entropy)
