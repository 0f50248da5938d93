"""One optimizer step of the RL update: micro-batched forward/backward with global loss divisors,
gradient clipping, the optimizer and schedule steps, and the step's metrics.

Each micro-batch's loss is formed inside the LM-head pass (`kernels.linear_logprob_loss` through
`forward_logprobs(token_loss=...)`) on its response rows only: `policy_loss` restated per token
(`PolicyTokenLoss`, the global divisors folded into per-token weights), so no prompt or padding
row reaches the LM head and its backward does not recompute the logits. The metrics come from the
detached log-probs through `policy_loss` itself."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from resrl.algorithms import PolicyTokenLoss, aggregation_weights, policy_loss, token_advantages, truncated_is
from resrl.batch import RolloutBatch, responses_from_rows
from resrl.config import Config
from resrl.distributed import World, all_reduce_sum, common_count, idle_forward
from resrl.ranks import sum_over_ranks
from resrl.weights import InlineWeights


def _token_loss(
    batch: RolloutBatch,
    mb: list[int],
    t: dict[str, torch.Tensor],
    seq_adv: torch.Tensor,
    cfg: Config,
    counts: tuple[float, float],
    inline: InlineWeights | None,
    formed: dict[str, torch.Tensor],
    sub_hidden_MD: torch.Tensor | None = None,
) -> PolicyTokenLoss:
    """Micro-batch `mb`'s `policy_loss` written per token (its collated tensors `t`, the global
    token and sequence counts), with the ResRL weights of its whole groups formed from its own
    forward's subspace hidden states when given (`InlineWeights`). The token advantages and mask
    go to `formed` for the metrics."""
    algo = cfg.algorithm
    weight_bT = t.get("resrl_weight")
    if sub_hidden_MD is not None:
        lengths = [len(batch.response_ids[i]) for i in mb]
        weight_bT = inline.weights(mb, sub_hidden_MD, lengths, weight_bT)
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
    return PolicyTokenLoss(
        adv_BT[resp_bT],
        agg_BT[resp_bT],
        old_logprob=None if old_bT is None else old_bT[resp_bT],
        ref_logprob=None if ref_bT is None else ref_bT[resp_bT],
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
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
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
    the trainer planned them). Every rank calls it (collectives)."""
    algo = cfg.algorithm
    lengths = batch.response_lengths()
    pos = batch.positive
    if algo.objective == "psr":
        kept = [i for i in idx if pos[i]]
    elif algo.objective == "nsr":
        kept = [i for i in idx if not pos[i]]
    else:
        kept = idx
    # The divisors are global (all ranks): micro-batching and data parallelism never change the
    # gradient. FSDP averages gradients over ranks, hence the factor world.size on the loss.
    local = [float(lengths[kept].sum()) if kept else 0.0, float(sum(1 for i in kept if lengths[i] > 0))]
    token_count, seq_count = all_reduce_sum(local, world, device)
    if token_count == 0:
        return {"optim/skipped_empty": 1.0}
    scale = float(world.size)
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    gap_sum = gap_n = 0.0
    packed = cfg.train.pack
    budget = cfg.train.max_tokens_per_micro_batch if packed else 0
    if inline is not None:
        chunks, _ = batch.group_micro_batches(idx, cfg.train.micro_batch_size, budget)
    else:
        chunks = batch.micro_batches(idx, cfg.train.micro_batch_size, budget)
    for _ in range(common_count(len(chunks), world, device) - len(chunks)):
        (0.0 * idle_forward(policy, pad_id, device)["logprob"].sum()).backward()
    for mb in chunks:
        t = batch.collate(mb, pad_id, device, packed=packed)
        old_bT, ref_bT = t.get("old_logprob"), t.get("ref_logprob")
        formed: dict[str, torch.Tensor] = {}
        token_loss_of = functools.partial(
            _token_loss, batch, mb, t, seq_adv, cfg, (token_count, seq_count), inline, formed
        )
        # The loss inside the LM-head pass, on the response rows only.
        if inline is not None and inline.wants(mb):
            loss_args = {"subspace_layer": algo.subspace_layer, "token_loss_fn": token_loss_of}
        else:
            loss_args = {"token_loss": token_loss_of()}
        out = policy(
            t["input_ids"],
            t.get("attention_mask"),
            position_ids=t.get("position_ids"),
            positions=t["positions"],
            temperature=cfg.rollout.temperature,
            return_entropy=True,
            **loss_args,
        )
        adv_BT, mask_BT = formed["adv"], formed["mask"]
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
    params = [p for p in policy.parameters() if p.requires_grad]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"step {step}: the gradient norm is {grad_norm}; lower optim.lr or check the data"
        )
    optimizer.step()
    scheduler.step()
    sums["_gap_sum"], sums["_gap_n"] = gap_sum, gap_n
    sums = sum_over_ranks(sums, world)
    w = sums.pop("_w", 0.0) or 1.0
    gap_sum, gap_n = sums.pop("_gap_sum"), sums.pop("_gap_n")
    out = {k: (v if k in ("loss/pg", "loss/ratio_max", "loss/ratio_min") else v / w) for k, v in sums.items()}
    out["optim/grad_norm"] = grad_norm
    if first and gap_n:
        out["rollout/logprob_gap"] = gap_sum / gap_n
    return out
