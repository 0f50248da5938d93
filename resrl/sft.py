"""Supervised warm start on reference solutions, so the base policy is right sometimes before RL.

The loss is the mean negative log-likelihood of the solution tokens (and the EOS after them)
through the same fused `linear_logprob` path as RL; prompt tokens are not trained.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from resrl.batch import pad_sequences
from resrl.config import RunError, SFTConfig
from resrl.data import Example
from resrl.distributed import SINGLE, World


def solution_ids(examples: list[Example], tokenizer) -> list[list[int]]:
    """Token ids of each example's solution followed by EOS."""
    missing = [ex.index for ex in examples if not ex.solution]
    if missing:
        raise ValueError(
            f"the supervised warm start (sft.steps > 0) needs a 'solution' for every training row; rows "
            f"{missing[:5]} have none. Add solutions or set sft.steps=0"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the warm start must teach the policy to stop")
    return [list(tokenizer.encode(ex.solution, add_special_tokens=False)) + [eos] for ex in examples]


def warm_start(
    policy: nn.Module,
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    cfg: SFTConfig,
    *,
    pad_id: int,
    seed: int,
    progress: bool = False,
    world: World = SINGLE,
    device: torch.device | None = None,
) -> dict[str, float]:
    """`cfg.steps` AdamW steps on random batches of (prompt, solution) pairs (each rank takes its
    share of every batch; FSDP averages the ranks' gradients). Returns loss metrics."""
    if cfg.batch_size < world.size:
        raise ValueError(f"sft.batch_size={cfg.batch_size} is smaller than the {world.size} processes")
    # The compute device (CPU-offloaded shards live on the CPU): given, or the parameters'.
    device = device or next(policy.parameters()).device
    # The causal LM's own parameters (never R²PO's rollout head, a sibling inside the Policy).
    params = [p for p in getattr(policy, "model", policy).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    policy.train()
    start = time.perf_counter()
    losses = []
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="warm start", leave=False)
    for step in steps:
        idx = torch.randint(len(prompt_ids), (cfg.batch_size,), generator=gen).tolist()[
            world.rank :: world.size
        ]
        ids_BL, mask_BL, resp_BT = pad_sequences(
            [prompt_ids[i] for i in idx], [target_ids[i] for i in idx], pad_id
        )
        ids_BL, mask_BL, resp_BT = ids_BL.to(device), mask_BL.to(device), resp_BT.to(device)
        try:
            logprob_BT = policy(ids_BL, mask_BL)["logprob"]
        except ValueError as e:
            # The kernels' value checks: the weights produced non-finite hidden states.
            if "NaN or Inf" not in str(e):
                raise
            raise RunError(
                f"the warm start stopped at step {step + 1} of {cfg.steps}: {e}; lower sft.lr"
            ) from e
        loss = -torch.where(resp_BT, logprob_BT, 0.0).sum() / resp_BT.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        # The global norm (the same on every rank), checked before the optimizer step, so a
        # non-finite loss or gradient never reaches the weights.
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise RunError(
                f"the warm start stopped at step {step + 1} of {cfg.steps}: the gradient norm is {norm} "
                f"(loss {float(loss.detach())}); lower sft.lr"
            )
        optimizer.step()
        losses.append(loss.detach())
        if progress:
            steps.set_postfix(loss=f"{float(losses[-1]):.3f}")
    if not losses:
        return {}
    values = torch.stack(losses).tolist()
    return {
        "sft/loss_first": values[0],
        "sft/loss_last": sum(values[-10:]) / len(values[-10:]),
        "sft/seconds": time.perf_counter() - start,
    }
