"""The no-grad pre-pass over a rollout batch: old/reference log-probs and ResRL token weights.

ResRL weights (ALGORITHMS.md §4) need complete groups. On an on-policy update whose micro-batches
hold whole groups they are formed inside the update's own forward (`resrl.weights.InlineWeights`);
the pre-pass weighs the other mixed groups (`groups`) and is skipped where nothing needs it.
Sequences are visited positives first: by the time the first negative sequence is forwarded, every
mixed group's positive pool is complete and its basis built, so each negative token's distance is
computed straight from the forward and only one float per token is kept (the subspace hidden
states of negatives are never stored). The result equals `resrl.algorithms.resrl_token_weights` on
the gathered tokens (tested).

Only response rows are read (`forward_logprobs(positions=...)`): the LM head scores them alone,
and not at all when no old log-probs are wanted (an on-policy ResRL update needs only the trunk).
Only the sequences something is computed for are forwarded: all of them for old or reference
log-probs, otherwise those of the groups weighed here.
"""

from __future__ import annotations

import torch
from torch import nn

from resrl.batch import RolloutBatch
from resrl.config import AlgorithmConfig
from resrl.distributed import SINGLE, World, common_count, idle_forward
from resrl.weights import WeightStats, distances, group_bases, mixed_groups, negative_weights


@torch.no_grad()
def prepass(
    policy: nn.Module,
    batch: RolloutBatch,
    algo: AlgorithmConfig,
    *,
    temperature: float,
    micro_batch_size: int,
    pad_id: int,
    max_tokens: int = 0,
    seed: int,
    need_old: bool,
    ref_policy: nn.Module | None = None,
    world: World = SINGLE,
    device: torch.device | None = None,
    groups: set[int] | None = None,
    stats: WeightStats | None = None,
    forward: dict | None = None,
) -> dict[str, float]:
    """Fill batch.token_values with old_logprob (if need_old), ref_logprob (if ref_policy) and
    resrl_weight (objective resrl: the mixed groups in `groups`, all when None; 1 elsewhere).
    Micro-batches hold `micro_batch_size` padded sequences, or are packed up to `max_tokens` tokens
    when that is > 0. Adds the weights' sums to `stats` and returns this rank's `resrl/*` metrics
    of the groups weighed here. `forward`: options of the policy's forwards (R²PO's stage A scores
    old log-probs with π_roll: rollout_head=True). Every rank calls it (collectives)."""
    # Only forwards that score old log-probs use them (ResRL's hidden states are the trunk's).
    forward = (forward or {}) if need_old else {}
    use_resrl = algo.objective == "resrl"
    if not (need_old or ref_policy is not None or use_resrl):
        return {}
    # Where the forward computes: the parameters' device, unless given (CPU-offloaded shards live
    # on the CPU while the forward runs on the GPU).
    device = device or next(policy.parameters()).device
    b = len(batch)
    positive = batch.positive.tolist()
    group = batch.group.tolist()
    mixed = mixed_groups(positive, group) if use_resrl else set()
    if groups is not None:
        mixed &= groups

    old: list[torch.Tensor | None] = [None] * b
    ref: list[torch.Tensor | None] = [None] * b
    pools: dict[int, list[torch.Tensor]] = {}
    dist: dict[int, torch.Tensor] = {}
    basis_GDK = mean_GD = None
    row_of: dict[int, int] = {}
    bases_built = False
    # Every sequence when log-probs are wanted, else only the weighed groups'. Positives first
    # (stable), so the pools are complete before the first negative.
    visit = [i for i in range(b) if need_old or ref_policy is not None or group[i] in mixed]
    order = [i for i in visit if positive[i]] + [i for i in visit if not positive[i]]
    # Cut without reordering: the positives must stay first.
    chunks = batch.chunks(order, micro_batch_size, max_tokens)
    for _ in range(common_count(len(chunks), world, device) - len(chunks)):
        idle_forward(policy, pad_id, device, **forward)
        if ref_policy is not None:
            idle_forward(ref_policy, pad_id, device)
    for idx in chunks:
        mb = batch.collate(idx, pad_id, device, packed=max_tokens > 0)
        wants_hidden = any(group[i] in mixed for i in idx)
        inputs = (mb["input_ids"], mb.get("attention_mask"))
        # Response rows only: outputs are [M] (or [M, D]), sequence after sequence.
        lengths = [len(batch.response_ids[i]) for i in idx]
        out = None
        if need_old or wants_hidden:
            out = policy(
                *inputs,
                position_ids=mb.get("position_ids"),
                positions=mb["positions"],
                temperature=temperature,
                subspace_layer=algo.subspace_layer if wants_hidden else None,
                # The LM head only when old log-probs are wanted (ResRL alone needs the trunk).
                logprobs=need_old,
                **forward,
            )
        elif world.distributed:
            # The other ranks may forward the policy here: its collectives must pair up.
            idle_forward(policy, pad_id, device, **forward)
        if need_old:
            for i, lp in zip(idx, out["logprob"].cpu().split(lengths), strict=True):
                old[i] = lp
        if ref_policy is not None:
            ref_out = ref_policy(
                *inputs,
                position_ids=mb.get("position_ids"),
                positions=mb["positions"],
                temperature=temperature,
            )
            for i, lp in zip(idx, ref_out["logprob"].cpu().split(lengths), strict=True):
                ref[i] = lp
        if not wants_hidden:
            continue
        neg_rows, neg_chunks = [], []
        for i, tokens_RD in zip(idx, out["sub_hidden"].split(lengths), strict=True):
            if group[i] not in mixed:
                continue
            if positive[i]:
                pools.setdefault(group[i], []).append(tokens_RD)
            else:
                neg_rows.append(i)
                neg_chunks.append(tokens_RD)
        if not neg_rows:
            continue
        if not bases_built:
            basis_GDK, mean_GD, row_of = group_bases(pools, algo, seed)
            pools.clear()
            bases_built = True
        keep = [j for j, i in enumerate(neg_rows) if group[i] in row_of]
        if not keep:
            continue
        rows = [row_of[group[neg_rows[j]]] for j in keep]
        pieces = distances([neg_chunks[j] for j in keep], rows, basis_GDK, mean_GD)
        for j, piece in zip(keep, pieces, strict=True):
            dist[neg_rows[j]] = piece

    if need_old:
        batch.token_values["old_logprob"] = old  # type: ignore[assignment]
    if ref_policy is not None:
        batch.token_values["ref_logprob"] = ref  # type: ignore[assignment]
    if not use_resrl:
        return {}
    local = WeightStats(groups_mixed=len(mixed), groups_in_prepass=len(mixed), groups_weighted=len(row_of))
    found = negative_weights(dist, {i: row_of[group[i]] for i in dist}, algo, local)
    if stats is not None:
        stats.add(local)
    # 1 for every token not weighed here (positives, other groups); the update replaces the rows of
    # the groups it weighs itself.
    weights = [torch.ones(len(r)) for r in batch.response_ids]
    for i, w in found.items():
        weights[i] = w.cpu()
    batch.token_values["resrl_weight"] = weights
    return local.metrics()
