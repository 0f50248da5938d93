"""What each objective changes in an RL step, in one place (the loop itself tests no objective name).

- `uses_reference`: whether a frozen copy of the starting policy is kept (a KL term, ACE);
- `needs_old_logprobs`: whether the pre-pass computes old log-probs (off-policy updates, ACE);
- `after_prepass`: the sequence advantages completed from the pre-pass's values (ACE's rescaling);
- `loss_sequences`: which sequences a mini-batch's loss covers (PSR: positives, NSR: negatives);
- per-token advantages and the loss: `resrl.algorithms.token_advantages` / `PolicyTokenLoss`;
- ResRL's token weights: `resrl.weights` (planned per step by `plan_weights`).

R²PO's stages (`resrl.r2po`) run these with the stage's own `AlgorithmConfig`: stage A trains the
rollout head with a GRPO-shaped loss on its own advantages; they add no branch to the loop.
"""

from __future__ import annotations

import torch

from resrl.algorithms import ace_advantages
from resrl.batch import RolloutBatch
from resrl.config import AlgorithmConfig
from resrl.distributed import World
from resrl.ranks import sum_over_ranks


def uses_reference(algo: AlgorithmConfig) -> bool:
    """A frozen copy of the starting policy is kept for the KL term and for ACE."""
    return algo.kl_coef > 0 or algo.objective == "ace"


def needs_old_logprobs(algo: AlgorithmConfig, n_updates: int) -> bool:
    """Old log-probs from the pre-pass: off-policy updates (more than one optimizer step per
    rollout batch) need them for the ratio, ACE for its confidence shift."""
    return n_updates > 1 or algo.objective == "ace"


def loss_sequences(algo: AlgorithmConfig, idx: list[int], positive: torch.Tensor) -> list[int]:
    """The sequences of `idx` the loss covers (its token and sequence counts are theirs)."""
    if algo.objective == "psr":
        return [i for i in idx if positive[i]]
    if algo.objective == "nsr":
        return [i for i in idx if not positive[i]]
    return idx


def after_prepass(
    algo: AlgorithmConfig, batch: RolloutBatch, seq_adv: torch.Tensor, world: World, *, keep_old: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """The sequence advantages once the pre-pass's values exist, and their metrics.

    ACE: each negative's advantage scaled by its confidence shift, from the pre-pass log-probs
    (policy at the step's start and reference); the old log-probs stay for the loss only when
    later updates are off-policy (`keep_old`). Other objectives: unchanged."""
    if algo.objective != "ace":
        return seq_adv, {}
    old = batch.token_values["old_logprob"] if keep_old else batch.token_values.pop("old_logprob")
    seq_lp = torch.stack([lp.sum() for lp in old])
    seq_ref = torch.stack([lp.sum() for lp in batch.token_values["ref_logprob"]])
    out, shift = ace_advantages(seq_adv, seq_lp, seq_ref, alpha=algo.ace_alpha)
    neg = seq_adv < 0
    sums = sum_over_ranks(
        {
            "n": float(neg.sum()),
            "shift": float(shift[neg].sum()),
            "scale": float((out / seq_adv)[neg].sum()),
        },
        world,
    )
    metrics = {}
    if sums["n"]:
        metrics["ace/shift_mean_neg"] = sums["shift"] / sums["n"]
        metrics["ace/scale_mean_neg"] = sums["scale"] / sums["n"]
    return out, metrics
