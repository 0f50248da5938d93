"""The no-grad pre-pass over a whole rollout batch: old/reference log-probs and ResRL token weights.

ResRL weights (ALGORITHMS.md §4) need complete groups, so they are computed here, once per rollout
batch, never inside a training micro-batch. Sequences are visited positives first: by the time the
first negative sequence is forwarded, every mixed group's positive pool is complete and its basis
built, so each negative token's distance is computed straight from the forward and only one float
per token is kept (the subspace hidden states of negatives are never stored). The result equals
`resrl.algorithms.resrl_token_weights` on the gathered tokens (tested).

Only response rows are read (`forward_logprobs(positions=...)`): the LM head scores them alone,
and not at all when no old log-probs are wanted (an on-policy ResRL update needs only the trunk).
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from resrl.algorithms import group_seed
from resrl.batch import RolloutBatch
from resrl.config import AlgorithmConfig
from resrl.distributed import SINGLE, World, common_count, idle_forward

# A group's basis needs at least this many positive tokens (ALGORITHMS.md §4.3).
MIN_POS_TOKENS = 4


def _bases(pools: dict[int, list[torch.Tensor]], algo: AlgorithmConfig, seed: int):
    """Stacked zero-padded bases [G', D, k], means [G', D] and {group id: row} of groups that get one."""
    bases, means, row_of = [], [], {}
    for gid, chunks in pools.items():
        pool_MD = torch.cat(chunks)
        if pool_MD.shape[0] < MIN_POS_TOKENS:
            continue
        gen = torch.Generator().manual_seed(group_seed(seed, gid))
        basis_DK, mean_D = kernels.subspace_basis(
            pool_MD, rank=algo.subspace_rank, max_tokens=algo.subspace_max_tokens, generator=gen
        )
        if basis_DK.shape[1] < 1:
            continue
        row_of[gid] = len(bases)
        bases.append(basis_DK)
        means.append(mean_D)
    if not bases:
        return None, None, row_of
    k_max = max(b.shape[1] for b in bases)
    basis_GDK = torch.stack([nn.functional.pad(b, (0, k_max - b.shape[1])) for b in bases])
    return basis_GDK, torch.stack(means), row_of


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
) -> dict[str, float]:
    """Fill batch.token_values with old_logprob (if need_old), ref_logprob (if ref_policy) and
    resrl_weight (objective resrl). Micro-batches hold `micro_batch_size` padded sequences, or are
    packed up to `max_tokens` tokens when that is > 0. Returns metrics of the ResRL weights."""
    use_resrl = algo.objective == "resrl"
    if not (need_old or ref_policy is not None or use_resrl):
        return {}
    # Where the forward computes: the parameters' device, unless given (CPU-offloaded shards live
    # on the CPU while the forward runs on the GPU).
    device = device or next(policy.parameters()).device
    b = len(batch)
    positive = batch.positive.tolist()
    group = batch.group.tolist()
    has_pos, has_neg = set(), set()
    for i in range(b):
        (has_pos if positive[i] else has_neg).add(group[i])
    mixed = has_pos & has_neg if use_resrl else set()

    old: list[torch.Tensor | None] = [None] * b
    ref: list[torch.Tensor | None] = [None] * b
    pools: dict[int, list[torch.Tensor]] = {}
    dist: dict[int, torch.Tensor] = {}
    basis_GDK = mean_GD = None
    row_of: dict[int, int] = {}
    bases_built = False
    # Positives first (stable), so the pools are complete before the first negative.
    order = [i for i in range(b) if positive[i]] + [i for i in range(b) if not positive[i]]
    # Cut without reordering: the positives must stay first.
    chunks = batch.chunks(order, micro_batch_size, max_tokens)
    for _ in range(common_count(len(chunks), world, device) - len(chunks)):
        idle_forward(policy, pad_id, device)
        if ref_policy is not None:
            idle_forward(ref_policy, pad_id, device)
    for idx in chunks:
        mb = batch.collate(idx, pad_id, device, packed=max_tokens > 0)
        wants_hidden = any(group[i] in mixed for i in idx)
        inputs = (mb["input_ids"], mb.get("attention_mask"))
        # Response rows only: outputs are [M] (or [M, D]), sequence after sequence.
        lengths = [len(batch.response_ids[i]) for i in idx]
        out = policy(
            *inputs,
            position_ids=mb.get("position_ids"),
            positions=mb["positions"],
            temperature=temperature,
            subspace_layer=algo.subspace_layer if wants_hidden else None,
            # The LM head only when old log-probs are wanted (ResRL alone needs the trunk).
            logprobs=need_old,
        )
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
            basis_GDK, mean_GD, row_of = _bases(pools, algo, seed)
            pools.clear()
            bases_built = True
        keep = [j for j, i in enumerate(neg_rows) if group[i] in row_of]
        if not keep:
            continue
        tokens_ND = torch.cat([neg_chunks[j] for j in keep])
        gidx_N = torch.cat(
            [
                torch.full((neg_chunks[j].shape[0],), row_of[group[neg_rows[j]]], dtype=torch.long)
                for j in keep
            ]
        ).to(tokens_ND.device)
        d_N = kernels.subspace_residual(tokens_ND, basis_GDK, mean_GD, gidx_N).cpu()
        for j, piece in zip(keep, d_N.split([neg_chunks[j].shape[0] for j in keep]), strict=True):
            dist[neg_rows[j]] = piece

    if need_old:
        batch.token_values["old_logprob"] = old  # type: ignore[assignment]
    if ref_policy is not None:
        batch.token_values["ref_logprob"] = ref  # type: ignore[assignment]
    if not use_resrl:
        return {}
    weights = [torch.ones(len(r)) for r in batch.response_ids]
    metrics = {"resrl/groups_mixed": float(len(mixed)), "resrl/groups_weighted": float(len(row_of))}
    if dist:
        seqs = sorted(dist)
        d_N = torch.cat([dist[i] for i in seqs])
        g_N = torch.cat([torch.full((dist[i].shape[0],), row_of[group[i]], dtype=torch.long) for i in seqs])
        w_N = kernels.residual_weights(
            d_N,
            g_N,
            torch.ones_like(g_N, dtype=torch.bool),
            q_low=algo.q_low,
            q_high=algo.q_high,
            min_weight=algo.min_weight,
        )
        for i, w in zip(seqs, w_N.split([dist[i].shape[0] for i in seqs]), strict=True):
            weights[i] = w
        metrics.update(
            {
                "resrl/neg_weight_mean": float(w_N.mean()),
                "resrl/neg_weight_min_frac": float((w_N <= algo.min_weight + 1e-6).float().mean()),
                "resrl/distance_mean": float(d_N.mean()),
                "resrl/neg_tokens": float(d_N.numel()),
            }
        )
    batch.token_values["resrl_weight"] = weights
    return metrics
