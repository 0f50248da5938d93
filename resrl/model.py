"""Model handling: a small Qwen3 from a config, the trainer-owned forward, the subspace hidden states.

The trainer never asks the model for logits: `forward_logprobs` runs the decoder trunk
(`model.model`) and feeds its final hidden states to `kernels.linear_logprob` with the LM-head
weight, so no [tokens x vocab] tensor exists. The penultimate-layer hidden states ResRL needs are
taken by one forward pre-hook on the last decoder layer (`HiddenCapture`), never with
`output_hidden_states`, which would keep every layer's output alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

import kernels

SUBSPACE_LAYERS = (None, "penultimate", "final")


def build_qwen3(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialized Qwen3 causal LM (fp32, SDPA attention), identical for the same seed.

    The global RNG state is left untouched (initialization runs under a forked RNG). head_dim
    must be >= 32: vLLM's CPU attention rejects 16 (ARCHITECTURE.md), and the same model is meant
    to be served by either rollout engine.
    """
    ints = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 32 or head_dim % 2:
        raise ValueError(
            f"head_dim must be an even int >= 32 (vLLM CPU attention rejects 16), got {head_dim!r}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def _trunk(model: nn.Module) -> nn.Module:
    """The decoder trunk (`model.model` of a Hugging Face causal LM), which owns `.layers`."""
    trunk = getattr(model, "model", None)
    if trunk is None or not isinstance(getattr(trunk, "layers", None), nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} is not a supported causal LM: expected `model.model.layers` "
            "(Qwen2/Qwen3/Llama-style decoder trunk) and `model.lm_head`"
        )
    return trunk


class HiddenCapture:
    """Context manager capturing the input of the last decoder layer (the penultimate layer's output).

    Usage::

        with HiddenCapture(model) as cap:
            model.model(input_ids, attention_mask=...)
        hidden_BLD = cap.hidden  # detached, [B, L, D]

    The pre-hook reads `hidden_states` whether the layer gets it positionally (how Qwen3Model and
    GradientCheckpointingLayer call it in transformers 5.x) or as a keyword. The hook is removed
    on exit, so a gradient-checkpointing recompute in backward does not overwrite the capture.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layer = _trunk(model).layers[-1]
        self.hidden: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(
                f"HiddenCapture: the last decoder layer ({type(module).__name__}) was called without a "
                "hidden_states tensor (neither first positional argument nor `hidden_states=`)"
            )
        self.hidden = hidden.detach()

    def __enter__(self) -> HiddenCapture:
        self.hidden = None
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding keeps positions 0, 1, ...

    Padding positions get 0 (their outputs are never used).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, L] int64
    attention_mask: torch.Tensor | None,  # [B, L] 0/1, or None for packed rows
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    subspace_layer: str | None = None,
    position_ids: torch.Tensor | None = None,  # [B, L]
    positions: torch.Tensor | None = None,  # [M] int64, into the [B * (L-1)] logprob layout
    logprobs: bool = True,
    token_loss: kernels.fused_loss.TokenLoss | None = None,
    token_loss_fn: Callable[..., kernels.fused_loss.TokenLoss] | None = None,
    rollout_head: nn.Module | None = None,
    trunk_grad: bool = True,
    return_base: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Log-prob of each next token under the model, without logits.

    Returns dict(logprob [B, L-1] fp32, entropy [B, L-1] fp32 or None, sub_hidden [B, L-1, D] or
    None): position t scores input_ids[:, t + 1] (logits divided by `temperature`). `sub_hidden`
    (detached, the model's dtype) is the input of the last decoder layer for "penultimate" or the
    final normed hidden state for "final", at the same positions. Padded positions get values too;
    callers mask them.

    Packed rows (several sequences concatenated, no padding): pass `attention_mask=None` and
    `position_ids` restarting at 0 for each sequence; transformers then keeps the sequences apart
    (a block-causal mask with SDPA, varlen with flash-attn). The position scoring the first token
    of the next sequence is meaningless; callers never select it.

    Only the rows that count (`positions`): the flat positions, in the [B * (L-1)] layout above,
    whose scores the caller uses (the response tokens, `RolloutBatch.collate`'s "positions"). The
    LM head then runs on those M rows alone, never on prompt or padding rows, and logprob and
    entropy are [M], sub_hidden [M, D], in the order of `positions`. `logprobs=False` skips the
    LM head altogether (logprob and entropy None): the pre-pass of an on-policy ResRL update wants
    only the hidden states.

    The loss inside the LM-head pass (`token_loss`, with `positions`): the per-token loss of
    `kernels.linear_logprob_loss` over the M rows (e.g. `resrl.algorithms.PolicyTokenLoss`), its
    gradient formed chunk by chunk while the logits exist. Adds "loss" (0-dim fp32,
    differentiable w.r.t. the trunk and the LM head); logprob and entropy ([M]; entropy when
    `return_entropy`) then come back detached, for metrics.

    The loss from the same forward's hidden states (`token_loss_fn`, with `positions` and a
    `subspace_layer`): called with `sub_hidden` [M, D] after the trunk and before the LM head, it
    returns the token loss. The update's ResRL weights of whole groups are formed this way, so no
    second trunk forward is needed for them (`resrl.weights.InlineWeights`).

    R²PO's π_roll (`rollout_head`, a `resrl.rollout_head.RolloutHead`, with `positions`): logprob
    and entropy (and a `token_loss`, through autograd) are π_roll's, from the two-part fused LM
    head. `trunk_grad=False` runs the trunk under no_grad and detaches the LM-head weight, so only
    the head's W1 and W2 get gradients (stage A). `return_base` adds "base_logprob" [M], the
    policy's own log-prob at the same rows (no grad; passed to `token_loss_fn` as base_logprob).

    Runs `model.model` (the trunk) with position ids from the attention-mask cumsum, then
    `kernels.linear_logprob` (or `linear_logprob_loss`) on `model.lm_head.weight` (tied or not).
    Gradients flow to the trunk and the LM head through logprob and entropy (or the loss).
    """
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype
        not in (
            torch.int64,
            torch.int32,
        )
    ):
        raise ValueError(
            f"input_ids must be an int64/int32 tensor [B, L], got {getattr(input_ids, 'shape', input_ids)}"
        )
    if attention_mask is None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape:
            raise ValueError(
                "attention_mask=None (packed rows) needs position_ids with input_ids' shape "
                f"{tuple(input_ids.shape)}, got {getattr(position_ids, 'shape', position_ids)}"
            )
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor with input_ids' shape {tuple(input_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', attention_mask)}"
        )
    b, seq_len = input_ids.shape
    if seq_len < 2:
        raise ValueError(f"input_ids has L={seq_len}; need L >= 2 (position t predicts token t + 1)")
    if positions is not None and (
        not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype != torch.int64
    ):
        raise ValueError(
            f"positions must be an int64 tensor [M] of flat logprob-layout positions, got "
            f"{getattr(positions, 'shape', positions)}"
        )
    if positions is not None and positions.numel():
        lo, hi = torch.stack([positions.min(), positions.max()]).tolist()
        if lo < 0 or hi >= b * (seq_len - 1):
            raise ValueError(
                f"positions must lie in [0, B * (L-1)) = [0, {b * (seq_len - 1)}) for input_ids "
                f"[{b}, {seq_len}], got [{lo}, {hi}]"
            )
    if token_loss is not None and (positions is None or not logprobs):
        raise ValueError("token_loss needs positions (the rows the loss covers) and logprobs=True")
    if token_loss_fn is not None and (token_loss is not None or positions is None or not logprobs):
        raise ValueError("token_loss_fn needs positions and logprobs=True, and excludes token_loss")
    if (rollout_head is not None or return_base or not trunk_grad) and positions is None:
        raise ValueError("rollout_head, return_base and trunk_grad=False need positions (the rows scored)")
    if not logprobs and positions is None:
        raise ValueError("logprobs=False needs positions (the rows whose hidden states are wanted)")
    if subspace_layer not in SUBSPACE_LAYERS:
        raise ValueError(f"subspace_layer={subspace_layer!r} is not supported; use one of {SUBSPACE_LAYERS}")
    trunk = _trunk(model)
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, nn.Module) or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no `lm_head` with a weight")

    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    capture = HiddenCapture(model) if subspace_layer == "penultimate" else None
    with contextlib.ExitStack() as stack:
        if capture is not None:
            stack.enter_context(capture)
        if not trunk_grad:
            stack.enter_context(torch.no_grad())
        out = trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
    hidden_BLD = out.last_hidden_state
    weight_VD = lm_head.weight if trunk_grad else lm_head.weight.detach()
    d = hidden_BLD.shape[-1]
    if positions is None:
        hidden_ND = hidden_BLD[:, :-1].reshape(-1, d).to(weight_VD.dtype)
        target_N = input_ids[:, 1:].reshape(-1).long()
        logprob_N, entropy_N = kernels.linear_logprob(
            hidden_ND, weight_VD, target_N, temperature=temperature, return_entropy=return_entropy
        )
        sub_hidden = None
        if subspace_layer == "final":
            sub_hidden = hidden_BLD[:, :-1].detach()
        elif capture is not None:
            sub_hidden = capture.hidden[:, :-1]
        return {
            "logprob": logprob_N.view(b, seq_len - 1),
            "entropy": None if entropy_N is None else entropy_N.view(b, seq_len - 1),
            "sub_hidden": sub_hidden,
        }

    # Position p of the [B, L-1] layout is (p // (L-1), p % (L-1)): flat index p + p // (L-1) of
    # the [B, L] layout, which the contiguous trunk output is read at without a copy of it.
    positions = positions.to(hidden_BLD.device)
    flat_M = positions + positions // (seq_len - 1)
    hidden_MD = hidden_BLD.reshape(-1, d)[flat_M].to(weight_VD.dtype)
    target_M = input_ids.reshape(-1)[flat_M + 1].long()
    sub_hidden = None
    if subspace_layer == "final":
        sub_hidden = hidden_BLD.reshape(-1, d)[flat_M].detach()
    elif capture is not None:
        sub_hidden = capture.hidden.reshape(-1, d)[flat_M]
        capture.hidden = None  # the [B, L, D] capture is not kept past the gather
    result: dict[str, torch.Tensor | None] = {}
    base_M = None
    if return_base:
        with torch.no_grad():
            base_M, _ = kernels.linear_logprob(hidden_MD, weight_VD, target_M, temperature=temperature)
        result["base_logprob"] = base_M
    if token_loss_fn is not None:
        token_loss = token_loss_fn(sub_hidden=sub_hidden, base_logprob=base_M)
    logprob_M = entropy_M = None
    if rollout_head is not None:
        # π_roll through autograd (the head's gradients are the only ones in stage A).
        logprob_M, entropy_M = rollout_head(
            hidden_MD, weight_VD, target_M, temperature=temperature, return_entropy=return_entropy
        )
        if token_loss is not None:
            result["loss"] = token_loss(logprob_M, entropy_M, slice(0, logprob_M.shape[0]))
            logprob_M = logprob_M.detach()
            entropy_M = None if entropy_M is None else entropy_M.detach()
    elif token_loss is not None:
        result["loss"], logprob_M, entropy_M = kernels.linear_logprob_loss(
            hidden_MD, weight_VD, target_M, token_loss, temperature=temperature, with_entropy=return_entropy
        )
    elif logprobs:
        logprob_M, entropy_M = kernels.linear_logprob(
            hidden_MD, weight_VD, target_M, temperature=temperature, return_entropy=return_entropy
        )
    result.update({"logprob": logprob_M, "entropy": entropy_M, "sub_hidden": sub_hidden})
    return result
