"""One optimizer step of the RL update: micro-batched forward/backward with global loss divisors,
gradient clipping, the optimizer and schedule steps, and the step's metrics.

Each micro-batch's loss is formed inside the LM-head pass (`kernels.linear_logprob_loss` through
`forward_logprobs(token_loss=...)`) on its response rows only: `policy_loss` restated per token
(`PolicyTokenLoss`, the global divisors folded into per-token weights), so no prompt or padding
row reaches the LM head and its backward does not recompute the logits. The metrics come from the
detached log-probs through `policy_loss` itself.

What is trained is a `Stage`: a plain run has one, the policy's; R²PO adds the rollout head's
(`resrl.r2po`), whose update scores π_roll with the trunk frozen. The step itself is the same."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resrl.algorithms import (
    PolicyTokenLoss,
    aggregation_weights,
    group_advantages,
    policy_loss,
    token_advantages,
    truncated_is,
)
from resrl.batch import RolloutBatch, responses_from_rows
from resrl.config import AlgorithmConfig, Config
from resrl.distributed import World, all_reduce_sum, common_count, idle_forward
from resrl.objectives import loss_sequences
from resrl.ranks import sum_over_ranks
from resrl.weights import InlineWeights


@dataclass
class Stage:
    """One kind of RL step: what samples the rollouts, what the update trains, and with what loss.

    A plain run has one stage, the policy's (`Stage.policy`); R²PO alternates it with the rollout
    head's (`resrl.r2po`). The loop runs whichever stage the step has, without testing which."""

    name: str
    """policy or head."""
    algo: AlgorithmConfig
    """The loss's settings (objective, clip, KL, entropy, TIS)."""
    params: list[nn.Parameter]
    """What the optimizer steps and the gradient clip covers."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float
    """Gradient-norm clip; 0: none."""
    forward: dict[str, Any] = field(default_factory=dict)
    """Extra options of the update's forwards (the head's: rollout_head, trunk_grad, return_base)."""
    sample_head: bool = False
    """Rollouts are sampled from π_roll (R²PO: both stages)."""
    kl_to_base: bool = False
    """The KL term's reference is the policy's own log-prob of the same forward (base_logprob)."""
    sync: Callable[[], None] = lambda: None
    """Give the rollout engine what this stage trained (after the optimizer step)."""
    metric: str = "loss"
    """Prefix of the loss metrics (loss/..., head/...); the gradient norm is optim/grad_norm, or
    optim/<name>_grad_norm for another stage than the policy's."""
    advantages: Callable[[RolloutBatch], torch.Tensor] | None = None
    """The sequence advantages of a rollout batch; None: the group advantage `algo.advantage`."""

    def sequence_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        if self.advantages is not None:
            return self.advantages(batch)
        return group_advantages(batch.rewards, batch.group, self.algo.advantage, batch.positive)

    @property
    def scoring(self) -> dict[str, Any]:
        """The forward options that score with this stage's sampling policy (the pre-pass's old
        log-probs): π_roll for the head's stage."""
        return {"rollout_head": True} if self.forward.get("rollout_head") else {}

    @classmethod
    def policy(cls, policy: nn.Module, optimizer, scheduler, cfg: Config, **kw: Any) -> Stage:
        """The policy's stage: every trainable parameter of `policy.model` (never a rollout head)."""
        params = [p for p in policy.model.parameters() if p.requires_grad]
        return cls("policy", cfg.algorithm, params, optimizer, scheduler, cfg.optim.grad_clip, **kw)


def _token_loss(
    batch: RolloutBatch,
    mb: list[int],
    t: dict[str, torch.Tensor],
    seq_adv: torch.Tensor,
    cfg: Config,
    counts: tuple[float, float],
    inline: InlineWeights | None,
    formed: dict[str, torch.Tensor],
    algo: AlgorithmConfig,
    sub_hidden: torch.Tensor | None = None,
    base_logprob: torch.Tensor | None = None,
) -> PolicyTokenLoss:
    """Micro-batch `mb`'s `policy_loss` written per token (its collated tensors `t`, the global
    token and sequence counts), with the ResRL weights of its whole groups formed from its own
    forward's subspace hidden states when given (`InlineWeights`), and the KL reference from its
    own forward's policy log-probs when given (`base_logprob`, R²PO's head_kl_target=policy). The
    token advantages and mask go to `formed` for the metrics."""
    weight_bT = t.get("resrl_weight")
    if inline is not None and sub_hidden is not None:
        lengths = [len(batch.response_ids[i]) for i in mb]
        weight_bT = inline.weights(mb, sub_hidden, lengths, weight_bT)
    resp_bT = t["resp_mask"]
    if weight_bT is None and algo.objective == "resrl":
        # No pre-pass weights and none formed here: no group of this micro-batch is mixed.
        weight_bT = torch.ones(resp_bT.shape, device=resp_bT.device)
    adv_BT, mask_BT = token_advantages(
        algo.objective,
        seq_adv[mb].to(resp_bT.device),
        t["positive"],
        resp_bT,
        weight_bT,
        pos_scale=algo.pos_scale,
        w_lambda=algo.w_lambda,
    )
    formed["adv"], formed["mask"] = adv_BT, mask_BT
    agg_BT = aggregation_weights(mask_BT, algo.agg, *counts, cfg.rollout.max_new_tokens)
    old_bT, ref_bT = t.get("old_logprob"), t.get("ref_logprob")
    ref_M = None if ref_bT is None else ref_bT[resp_bT]
    if base_logprob is not None:
        ref_M = base_logprob
        formed["ref"] = responses_from_rows(base_logprob, t)
    return PolicyTokenLoss(
        adv_BT[resp_bT],
        agg_BT[resp_bT],
        old_logprob=None if old_bT is None else old_bT[resp_bT],
        ref_logprob=ref_M,
        sample_logprob=t["sample_logprob"][resp_bT],
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        dual_clip=algo.dual_clip,
        kl_coef=algo.kl_coef,
        kl_kind=algo.kl_kind,
        entropy_coef=algo.entropy_coef,
        tis_cap=algo.tis_cap,
    )


def optimizer_step(
    policy: nn.Module,
    stage: Stage,
    batch: RolloutBatch,
    idx: list[int],
    seq_adv: torch.Tensor,
    cfg: Config,
    *,
    world: World,
    device: torch.device,
    pad_id: int,
    first: bool,
    step: int,
    inline: InlineWeights | None = None,
) -> dict[str, float]:
    """Accumulate the loss of sequences `idx` of `batch` (this rank's share of one mini-batch)
    over micro-batches, then clip and step. `first`: the first update on this rollout batch, where
    the engine/trainer log-prob gap is measured. `inline`: ResRL weights of whole groups formed in
    the micro-batches' own forwards (on-policy updates; micro-batches then hold whole groups, as
    the trainer planned them). `stage`: what is trained, with which loss settings. Every rank
    calls it (collectives)."""
    algo = stage.algo
    lengths = batch.response_lengths()
    kept = loss_sequences(algo, idx, batch.positive)
    # The divisors are global (all ranks): micro-batching and data parallelism never change the
    # gradient. FSDP averages gradients over ranks, hence the factor world.size on the loss.
    local = [float(lengths[kept].sum()) if kept else 0.0, float(sum(1 for i in kept if lengths[i] > 0))]
    token_count, seq_count = all_reduce_sum(local, world, device)
    if token_count == 0:
        return {"optim/skipped_empty": 1.0}
    scale = float(world.size)
    policy.train()
    stage.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    gap_sum = gap_n = 0.0
    kl_sum = kl_n = 0.0
    packed = cfg.train.pack
    budget = cfg.train.max_tokens_per_micro_batch if packed else 0
    if inline is not None:
        chunks, _ = batch.group_micro_batches(idx, cfg.train.micro_batch_size, budget)
    else:
        chunks = batch.micro_batches(idx, cfg.train.micro_batch_size, budget)
    for _ in range(common_count(len(chunks), world, device) - len(chunks)):
        (0.0 * idle_forward(policy, pad_id, device, **stage.forward)["logprob"].sum()).backward()
    for mb in chunks:
        t = batch.collate(mb, pad_id, device, packed=packed)
        old_bT, ref_bT = t.get("old_logprob"), t.get("ref_logprob")
        formed: dict[str, torch.Tensor] = {}
        token_loss_of = functools.partial(
            _token_loss, batch, mb, t, seq_adv, cfg, (token_count, seq_count), inline, formed, algo
        )
        # The loss inside the LM-head pass, on the response rows only; built from the forward's
        # own hidden states (ResRL weights) or policy log-probs (a KL to them) when those are used.
        wants_hidden = inline is not None and inline.wants(mb)
        if wants_hidden or stage.kl_to_base:
            loss_args = {"token_loss_fn": token_loss_of}
            if wants_hidden:
                loss_args["subspace_layer"] = algo.subspace_layer
        else:
            loss_args = {"token_loss": token_loss_of()}
        out = policy(
            t["input_ids"],
            t.get("attention_mask"),
            position_ids=t.get("position_ids"),
            positions=t["positions"],
            temperature=cfg.rollout.temperature,
            return_entropy=True,
            **stage.forward,
            **loss_args,
        )
        adv_BT, mask_BT = formed["adv"], formed["mask"]
        ref_bT = formed.get("ref", ref_bT)
        (out["loss"] * scale).backward()
        # Metrics from the detached log-probs, through the policy_loss the per-token loss restates.
        logprob_bT = responses_from_rows(out["logprob"], t)
        with torch.no_grad():
            if algo.tis_cap > 0:
                adv_BT, tis_mean = truncated_is(
                    adv_BT,
                    mask_BT,
                    t["sample_logprob"],
                    logprob_bT if old_bT is None else old_bT,
                    cap=algo.tis_cap,
                )
                sums["rollout/tis_weight_mean"] = sums.get("rollout/tis_weight_mean", 0.0) + tis_mean
            _, m = policy_loss(
                logprob_bT,
                old_bT,
                adv_BT,
                mask_BT,
                eps_low=algo.eps_low,
                eps_high=algo.eps_high,
                dual_clip=algo.dual_clip,
                agg=algo.agg,
                token_count=token_count,
                seq_count=seq_count,
                norm_len=cfg.rollout.max_new_tokens,
                ref_logprob=ref_bT,
                kl_coef=algo.kl_coef,
                kl_kind=algo.kl_kind,
                entropy=responses_from_rows(out["entropy"], t),
                entropy_coef=algo.entropy_coef,
            )
        if first:
            with torch.no_grad():
                gap = (logprob_bT - t["sample_logprob"]).abs()
                gap_sum += float(torch.where(t["resp_mask"], gap, 0.0).sum())
                gap_n += float(t["resp_mask"].sum())
        if stage.sample_head and (first or "base_logprob" in out):
            # k1 estimate of KL(π_roll ‖ π) on π_roll's samples: the head's update scores both in
            # one forward; the policy's first (on-policy) update against the sampling log-probs.
            with torch.no_grad():
                if "base_logprob" in out:
                    diff = logprob_bT - responses_from_rows(out["base_logprob"], t)
                else:
                    diff = t["sample_logprob"] - logprob_bT
                kl_sum += float(torch.where(t["resp_mask"], diff, 0.0).sum())
                kl_n += float(t["resp_mask"].sum())
        w = m.pop("valid_tokens")
        sums["loss/pg"] = sums.get("loss/pg", 0.0) + m.pop("pg_loss")
        for key in ("ratio_max", "ratio_min"):
            value = m.pop(key)
            if w:
                prev = sums.get(f"loss/{key}")
                sums[f"loss/{key}"] = (
                    value if prev is None else (max if key == "ratio_max" else min)(prev, value)
                )
        for key, value in m.items():
            sums[f"loss/{key}"] = sums.get(f"loss/{key}", 0.0) + value * w
        sums["_w"] = sums.get("_w", 0.0) + w
    max_norm = stage.grad_clip if stage.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(stage.params, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"step {step}: the {stage.name}'s gradient norm is {grad_norm}; lower its lr or check the data"
        )
    stage.optimizer.step()
    stage.scheduler.step()
    sums.update(_gap_sum=gap_sum, _gap_n=gap_n, _kl_sum=kl_sum, _kl_n=kl_n)
    sums = sum_over_ranks(sums, world)
    w = sums.pop("_w", 0.0) or 1.0
    gap_sum, gap_n = sums.pop("_gap_sum"), sums.pop("_gap_n")
    kl_sum, kl_n = sums.pop("_kl_sum"), sums.pop("_kl_n")
    totals = ("loss/pg", "loss/ratio_max", "loss/ratio_min")
    out = {k: (v if k in totals else v / w) for k, v in sums.items()}
    if stage.metric != "loss":
        out = {(f"{stage.metric}/{k[5:]}" if k.startswith("loss/") else k): v for k, v in out.items()}
    out["optim/grad_norm" if stage.name == "policy" else f"optim/{stage.name}_grad_norm"] = grad_norm
    if first and gap_n:
        out["rollout/logprob_gap"] = gap_sum / gap_n
    if kl_n:
        out["r2po/rollout_kl"] = kl_sum / kl_n
    return out
