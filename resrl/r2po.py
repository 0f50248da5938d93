"""R²PO's stages (docs/ALGORITHMS.md §5): the rollout head and the policy trained in alternation.

Every training rollout is sampled from π_roll (the policy plus `resrl.rollout_head.RolloutHead`).
The step picks the stage, a pure function of the step (so a resume mid-round needs no state):

- stage A, `head` (the first `r2po.head_steps` steps of every round): the head alone trains, with its
  own AdamW and schedule; the trunk runs under no_grad and the LM head is detached, so only W1 and
  W2 get gradients. Its loss is the clipped surrogate on π_roll with the head's advantage (rarity,
  or GRPO's) and a k3 KL from π_roll to the reference model or to the current policy.
- stage B, `policy` (the next `r2po.policy_steps`): the policy trains with the configured objective
  on π_roll's samples (optional truncated IS against π_roll through `algorithm.tis_cap`); the head
  is untouched.

Both are `resrl.update.Stage`s; the trainer runs whichever `R2PO.stage(step)` returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from resrl.algorithms import group_advantages, rarity
from resrl.batch import RolloutBatch
from resrl.config import Config
from resrl.update import Stage

HEAD, POLICY = "head", "policy"


def stage_name(step: int, head_steps: int, policy_steps: int) -> str:
    """The stage of RL step `step` (0-based): rounds of `head_steps` head steps, then `policy_steps`
    policy steps."""
    return HEAD if step % (head_steps + policy_steps) < head_steps else POLICY


def head_algorithm(cfg: Config):
    """Stage A's loss settings: the run's clip, dual clip, aggregation and KL estimator, GRPO's
    per-token form of the head advantage, the head's KL coefficient; no entropy bonus, no TIS (the
    samples are π_roll's own)."""
    return dataclasses.replace(
        cfg.algorithm,
        objective="grpo",
        kl_coef=cfg.r2po.head_kl_coef,
        entropy_coef=0.0,
        tis_cap=0.0,
    )


class R2PO:
    """The head's stage (optimizer, schedule, engine sync) beside the policy's, and the schedule."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, policy_stage: Stage, engine: Any) -> None:
        r = cfg.r2po
        self.cfg, self.policy, self.engine = cfg, policy, engine
        self.head = policy.rollout_head
        params = [p for p in self.head.parameters() if p.requires_grad]
        lr = r.head_lr if r.head_lr is not None else cfg.optim.lr
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=r.head_weight_decay
        )
        warmup = r.head_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        to_policy = r.head_kl_coef > 0 and r.head_kl_target == "policy"
        self.policy_stage = policy_stage
        self.head_stage = Stage(
            HEAD,
            head_algorithm(cfg),
            params,
            optimizer,
            scheduler,
            r.head_grad_clip,
            forward={"rollout_head": True, "trunk_grad": False, "return_base": True},
            sample_head=True,
            kl_to_base=to_policy,
            sync=lambda: engine.sync_head(self.head),
            metric="head",
        )
        self.head_stage.advantages = lambda batch: self.advantages(batch)

    def stage(self, step: int) -> Stage:
        r = self.cfg.r2po
        return (
            self.head_stage if stage_name(step, r.head_steps, r.policy_steps) == HEAD else self.policy_stage
        )

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """Stage A's sequence advantages: rarity z-scored in the group, or GRPO's."""
        if self.cfg.r2po.head_advantage == "rarity":
            return group_advantages(rarity(_classes(batch), batch.group), batch.group, "grpo")
        return group_advantages(batch.rewards, batch.group, "grpo", batch.positive)

    def metrics(self, stage: Stage, batch: RolloutBatch, n_prompts: int) -> dict[str, float]:
        """r2po/stage (0 head, 1 policy), the head's weight norms, groups where the head's advantage
        is non-zero and the mean number of distinct rewards per group (what rarity acts on)."""
        classes = _classes(batch).view(n_prompts, -1)
        adv = self.advantages(batch).view(n_prompts, -1)
        distinct = [float(torch.unique(row).numel()) for row in classes]
        out = {
            "r2po/stage": 0.0 if stage is self.head_stage else 1.0,
            "r2po/head_adv_groups": float((adv.abs().amax(1) > 0).sum()),
            "r2po/distinct_rewards": sum(distinct) / len(distinct),
            "optim/head_lr": self.head_stage.scheduler.get_last_lr()[0],
        }
        out.update(self.head.norms())
        return out


def _classes(batch: RolloutBatch) -> torch.Tensor:
    """The rarity key: the reward before length scaling, rounded to 1e-6."""
    values = batch.rewards if batch.reward_class is None else batch.reward_class
    return torch.round(values.double() * 1e6) / 1e6
