"""The LM-head loss inside the pass: log-probs, the caller's per-token loss and its gradient at once.

`linear_logprob` returns log-probs; autograd then runs the caller's loss and calls back into the
kernel's backward, which recomputes every chunk's logits: 2·N·V·D FLOPs forward + 6·N·V·D backward.
Here the loss is a sum over token chunks of `token_loss(logprob_C, entropy_C, rows)`, so a chunk's
loss gradient w.r.t. its log-probs (and entropies) is known as soon as its log-probs are: on the
PyTorch path the chunk's logits are still in memory and become the logit gradient in place, and
two matmuls give the hidden and weight gradients. One matmul for the logits and two for the
gradients: 6·N·V·D FLOPs in all, in the forward. The backward only scales the stored gradients
by the upstream gradient of the loss.

The Triton path runs the same function in two passes: `logprob_forward` (log-probs, log-sum-exp,
entropies of all N tokens), the token loss and its gradient on the host, then `logprob_backward`
with those coefficients (8·N·V·D, the gradients again formed in the forward).

Memory: the PyTorch path holds one chunk's logits (two [C, V] fp32 buffers within
`RESRL_WORKSPACE_MB`, see `chunk_rows`) and the fp32 weight gradient [V, D]; both paths keep the hidden and
weight gradients ([N, D] and [V, D] in the inputs' dtypes) from the forward to the backward.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kernels._dispatch import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    raise_if_any,
    select_impl,
    value_checks_enabled,
)
from kernels.linear_logprob import logprob_backward, logprob_forward
from kernels.reference import linear_logprob_reference

# (logprob_C [C] fp32, entropy_C [C] fp32 or None, rows: the slice of the N tokens) -> 0-dim loss.
TokenLoss = Callable[[torch.Tensor, "torch.Tensor | None", slice], torch.Tensor]


def chunk_rows(n: int, v: int) -> int:
    """Tokens per chunk on the PyTorch path: two [C, V] fp32 buffers within `RESRL_WORKSPACE_MB`
    (default 256). Larger than `linear_logprob`'s 16 MiB chunks on purpose: every chunk adds a
    rank-C update into the whole [V, D] weight gradient and reads W twice, so on a CPU small
    chunks are bound by memory traffic, not FLOPs (measured in bench/bench_fused_loss.py:
    64-token chunks took 1.4-2.9x the time of full logits at V=65536; 512-token chunks do not)."""
    raw = os.environ.get("RESRL_WORKSPACE_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise ValueError(f"RESRL_WORKSPACE_MB={raw!r} must be a positive number of MiB")
    return max(1, min(n, int(mb * 2**20) // (2 * 4 * max(v, 1))))


def _chunk_loss_and_grads(
    token_loss: TokenLoss, logprob_C: torch.Tensor, entropy_C: torch.Tensor | None, rows: slice
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """token_loss on one chunk and its gradient w.r.t. the chunk's log-probs and entropies."""
    with torch.enable_grad():
        lp = logprob_C.detach().requires_grad_()
        ent = None if entropy_C is None else entropy_C.detach().requires_grad_()
        value = token_loss(lp, ent, rows)
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"token_loss must return a 0-dim floating tensor, got "
                f"{getattr(value, 'shape', type(value).__name__)} for rows {rows.start}:{rows.stop}"
            )
        inputs = [lp] if ent is None else [lp, ent]
        if value.requires_grad:
            grads = torch.autograd.grad(value, inputs, allow_unused=True)
        else:
            grads = (None,) * len(inputs)
    g_lp = torch.zeros_like(lp) if grads[0] is None else grads[0].float()
    g_ent = None
    if ent is not None:
        g_ent = torch.zeros_like(ent) if grads[1] is None else grads[1].float()
    return value.detach().float(), g_lp.detach(), None if g_ent is None else g_ent.detach()


def _torch_pass(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    token_loss: TokenLoss,
    temperature: float,
    with_entropy: bool,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, ...]:
    """(loss, logprob [N], entropy [N] or None, grad_hidden or None, grad_weight or None, finite flags)."""
    n, v = hidden_ND.shape[0], weight_VD.shape[0]
    weight_f32 = weight_VD.float()
    device = hidden_ND.device
    logprob_N = torch.empty(n, dtype=torch.float32, device=device)
    entropy_N = torch.empty_like(logprob_N) if with_entropy else None
    grad_h = torch.empty_like(hidden_ND) if need_h else None
    grad_w_f32 = torch.zeros_like(weight_f32) if need_w else None
    loss = torch.zeros((), dtype=torch.float32, device=device)
    finite = []
    step = chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden_ND[s:e].float()
        tgt = target_N[s:e, None]
        # Two [C, V] buffers: log p (later the entropy's share of the logit gradient) and p (later dz).
        logp = h @ weight_f32.T
        logp /= temperature
        logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
        p = torch.exp(logp)
        logprob_N[s:e] = logp.gather(1, tgt).squeeze(1)
        ent = None
        if with_entropy:
            # H = -sum_j p_j log p_j, as a batched dot product (no third [C, V] buffer)
            ent = -torch.bmm(p[:, None, :], logp[:, :, None]).view(-1)
            entropy_N[s:e] = ent
        value, g_lp, g_ent = _chunk_loss_and_grads(token_loss, logprob_N[s:e], ent, slice(s, e))
        loss += value
        finite.append(torch.isfinite(value))
        if not (need_h or need_w):
            continue
        # d logprob / d z_j = 1[j = target] - p_j; d H / d z_j = -p_j (log p_j + H)
        if g_ent is not None:
            logp.add_(ent[:, None]).mul_(p).mul_(g_ent[:, None])
        dz = p.mul_(-g_lp[:, None])
        dz.scatter_add_(1, tgt, g_lp[:, None])
        if g_ent is not None:
            dz -= logp
        dz /= temperature
        if need_h:
            grad_h[s:e] = (dz @ weight_f32).to(hidden_ND.dtype)
        if need_w:
            grad_w_f32.addmm_(dz.T, h)
    grad_w = grad_w_f32.to(weight_VD.dtype) if need_w else None
    return loss, logprob_N, entropy_N, grad_h, grad_w, finite


def _triton_pass(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    target_N: torch.Tensor,
    token_loss: TokenLoss,
    temperature: float,
    with_entropy: bool,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, ...]:
    """The same on the Triton kernels of `linear_logprob`: forward kernel, loss, backward kernels."""
    logprob_N, lse_N, entropy_N = logprob_forward(hidden_ND, weight_VD, target_N, temperature)
    ent = entropy_N if with_entropy else None
    n = hidden_ND.shape[0]
    loss, g_lp, g_ent = _chunk_loss_and_grads(token_loss, logprob_N, ent, slice(0, n))
    grad_h = grad_w = None
    if need_h or need_w:
        grad_h, grad_w = logprob_backward(
            hidden_ND, weight_VD, target_N, lse_N, ent, g_lp.contiguous(),
            None if g_ent is None else g_ent.contiguous(), temperature, need_h, need_w,
        )  # fmt: skip
    return loss, logprob_N, ent, grad_h, grad_w, [torch.isfinite(loss)]


class LinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden_ND, weight_VD, target_N, token_loss, temperature, with_entropy, impl, need_h, need_w
    ):
        run = _torch_pass if impl == "torch" else _triton_pass
        loss, logprob_N, entropy_N, grad_h, grad_w, finite = run(
            hidden_ND, weight_VD, target_N, token_loss, temperature, with_entropy, need_h, need_w
        )
        if value_checks_enabled():
            raise_if_any({"token_loss returned NaN or Inf": ~torch.stack(finite).all()})
        ctx.save_for_backward(grad_h, grad_w)
        outputs = (logprob_N,) if entropy_N is None else (logprob_N, entropy_N)
        ctx.mark_non_differentiable(*outputs)
        return loss, logprob_N, entropy_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob, _grad_entropy):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.float()
        out_h = None if grad_h is None else (grad_h * scale).to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * scale).to(grad_w.dtype)
        return out_h, out_w, None, None, None, None, None, None, None


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_loss: TokenLoss,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loss that is a sum over token chunks, computed inside the LM-head pass.

    Args:
        hidden: [N, D] fp32, bf16 or fp16 (final hidden states; any N, including 0 and 1).
        weight: [V, D], same dtype and device (the LM head).
        target: [N] int64 (int32 accepted) token ids in [0, V).
        token_loss: `token_loss(logprob_C, entropy_C, rows) -> 0-dim loss`, a differentiable
            PyTorch function of one chunk's log-probs [C] fp32 (and entropies [C] fp32, None
            unless `with_entropy`); `rows` is the slice of the N tokens the chunk covers. The loss
            is the sum of its values over chunks covering all N tokens, so it must be such a sum
            (a mean over tokens needs its global divisor passed in). Its only differentiable
            inputs are its arguments: gradients to anything it closes over are not propagated.
        temperature: > 0; logits are divided by it.
        with_entropy: compute the entropies and pass them to `token_loss`.

    Returns:
        (loss 0-dim fp32, differentiable w.r.t. `hidden` and `weight`; logprob [N] fp32 and
        entropy [N] fp32 or None, detached, for metrics). The gradients are computed in the
        forward (when grad mode is on and an input requires grad) and scaled by the upstream
        gradient of `loss` in the backward; the [N, V] logits are never materialized.
    """
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 2, FLOAT_DTYPES)
    check_tensor("target", target, 1, (torch.int64, torch.int32))
    check_same_device(hidden=hidden, weight=weight, target=target)
    if not callable(token_loss):
        raise TypeError(
            f"token_loss must be callable (logprob_C, entropy_C, rows) -> loss, got {token_loss!r}"
        )
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
        raise_if_any(
            {
                f"target has ids outside the vocabulary [0, {v})": ((target < 0) | (target >= v)).any(),
                "hidden contains NaN or Inf": ~torch.isfinite(hidden).all(),
                "weight contains NaN or Inf": ~torch.isfinite(weight).all(),
            }
        )
    if n == 0:
        # A sum over no chunks; still connected to both inputs so a backward reaches them.
        loss = (hidden.sum() * 0 + weight.sum() * 0).float()
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return loss, empty, (empty.clone() if with_entropy else None)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    impl = select_impl(hidden.device)
    return LinearLogprobLoss.apply(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), token_loss, temperature,
        with_entropy, impl, need_h, need_w,
    )  # fmt: skip


def linear_logprob_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_loss: TokenLoss,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The oracle: full-logits `linear_logprob_reference`, then `token_loss` on all N tokens as one
    chunk; differentiable by autograd. float64 inputs give a float64 ground truth."""
    logprob_N, entropy_N = linear_logprob_reference(
        hidden, weight, target.long(), temperature=temperature, return_entropy=with_entropy
    )
    loss = token_loss(logprob_N, entropy_N, slice(0, hidden.shape[0]))
    return loss, logprob_N.detach(), None if entropy_N is None else entropy_N.detach()
