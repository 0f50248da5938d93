"""ResRL token weights of whole prompt groups (ALGORITHMS.md §4): bases, distances, weights, metrics.

A negative token's weight needs its group's positive subspace, so it needs every positive response of
the group. Two places see complete groups:

- the update's own forward (`InlineWeights`), when the update is on-policy (one optimizer step per
  rollout batch) and a micro-batch holds the whole group (`RolloutBatch.group_micro_batches` plans
  micro-batches group-aligned): the subspace hidden states are captured in that forward, the
  weights formed before the LM-head pass takes its loss, and no second trunk forward runs;
- the no-grad pre-pass (`resrl.prepass`), for groups that do not fit one micro-batch and for
  off-policy updates, which run the pre-pass for their old log-probs anyway.

Both go through `group_bases` and `negative_weights`, with the same per-group seeds, so a group's
weights do not depend on the path (tested to 1e-6), and both add to one `WeightStats`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

import kernels
from resrl.algorithms import group_seed
from resrl.config import AlgorithmConfig
from resrl.distributed import World
from resrl.ranks import sum_over_ranks

# A group's basis needs at least this many positive tokens (ALGORITHMS.md §4.3).
MIN_POS_TOKENS = 4


def group_bases(
    pools: dict[int, list[torch.Tensor]], algo: AlgorithmConfig, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[int, int]]:
    """Bases of the groups whose positive pool ([M, D] pieces in sequence order) is large enough:
    stacked zero-padded bases [G', D, k], means [G', D] and {group id: row}. Each group's
    subsample/sketch draws from its own seed (`group_seed(seed, group id)`), so the result does not
    depend on which other groups are present."""
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


def distances(
    tokens: list[torch.Tensor], rows: list[int], basis_GDK: torch.Tensor, mean_GD: torch.Tensor
) -> list[torch.Tensor]:
    """Residual distance of each token of each negative sequence (`tokens[j]` [R_j, D]) to the basis
    of row `rows[j]`: one `kernels.subspace_residual` call for all of them, fp32 pieces [R_j]."""
    tokens_ND = torch.cat(tokens)
    gidx_N = torch.cat(
        [torch.full((t.shape[0],), r, dtype=torch.long) for t, r in zip(tokens, rows, strict=True)]
    ).to(tokens_ND.device)
    d_N = kernels.subspace_residual(tokens_ND, basis_GDK, mean_GD, gidx_N)
    return list(d_N.split([t.shape[0] for t in tokens]))


@dataclass
class WeightStats:
    """Sums behind the `resrl/*` metrics of one step, added over paths, micro-batches and ranks."""

    groups_mixed: float = 0.0  # groups with positive and negative responses
    groups_weighted: float = 0.0  # of those, groups that got a basis
    groups_in_update: float = 0.0  # mixed groups weighted inside the update's forward
    groups_in_prepass: float = 0.0  # mixed groups weighted by the pre-pass
    neg_tokens: float = 0.0
    weight_sum: float = 0.0
    at_min: float = 0.0  # tokens at the weight floor
    distance_sum: float = 0.0

    def add(self, other: WeightStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def metrics(self, world: World | None = None) -> dict[str, float]:
        """The step's metrics: sums over the ranks (when `world` is given), then the token means."""
        sums = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        if world is not None:
            sums = sum_over_ranks(sums, world)
        out = {
            f"resrl/{k}": sums[k]
            for k in ("groups_mixed", "groups_weighted", "groups_in_update", "groups_in_prepass")
        }
        n = sums["neg_tokens"]
        if n:
            out.update(
                {
                    "resrl/neg_weight_mean": sums["weight_sum"] / n,
                    "resrl/neg_weight_min_frac": sums["at_min"] / n,
                    "resrl/distance_mean": sums["distance_sum"] / n,
                    "resrl/neg_tokens": n,
                }
            )
        return out


def negative_weights(
    dist: dict[int, torch.Tensor], row: dict[int, int], algo: AlgorithmConfig, stats: WeightStats
) -> dict[int, torch.Tensor]:
    """Weights [R] fp32 (on the distances' device) of each negative sequence i from its token
    distances `dist[i]` and its group's row `row[i]` (`kernels.residual_weights`, per-group quantiles: the result of a sequence
    depends only on its own group's distances). Adds the token sums to `stats`."""
    if not dist:
        return {}
    seqs = sorted(dist)
    d_N = torch.cat([dist[i] for i in seqs])
    g_N = torch.cat(
        [torch.full((dist[i].shape[0],), row[i], dtype=torch.long, device=d_N.device) for i in seqs]
    )
    w_N = kernels.residual_weights(
        d_N,
        g_N,
        torch.ones_like(g_N, dtype=torch.bool),
        q_low=algo.q_low,
        q_high=algo.q_high,
        min_weight=algo.min_weight,
    )
    sums = torch.stack([w_N.sum(), (w_N <= algo.min_weight + 1e-6).float().sum(), d_N.float().sum()]).tolist()
    stats.neg_tokens += d_N.numel()
    stats.weight_sum += sums[0]
    stats.at_min += sums[1]
    stats.distance_sum += sums[2]
    return dict(zip(seqs, w_N.split([dist[i].shape[0] for i in seqs]), strict=True))


def weigh_groups(
    hidden: dict[int, torch.Tensor],
    positive: list[bool],
    group: list[int],
    groups: set[int],
    algo: AlgorithmConfig,
    seed: int,
    stats: WeightStats,
) -> dict[int, torch.Tensor]:
    """Weights of the negative sequences of `groups` (mixed groups, each whole in `hidden`: sequence
    index -> subspace hidden states [R, D] of its response tokens). The pools are the positives'
    tokens in sequence order, as the pre-pass builds them."""
    pools: dict[int, list[torch.Tensor]] = {}
    negatives = []
    for i in sorted(hidden):
        if group[i] not in groups:
            continue
        if positive[i]:
            pools.setdefault(group[i], []).append(hidden[i])
        else:
            negatives.append(i)
    basis_GDK, mean_GD, row_of = group_bases(pools, algo, seed)
    stats.groups_weighted += len(row_of)
    keep = [i for i in negatives if group[i] in row_of]
    if not keep:
        return {}
    rows = [row_of[group[i]] for i in keep]
    pieces = distances([hidden[i] for i in keep], rows, basis_GDK, mean_GD)
    return negative_weights(
        dict(zip(keep, pieces, strict=True)), dict(zip(keep, rows, strict=True)), algo, stats
    )


def mixed_groups(positive: list[bool], group: list[int]) -> set[int]:
    """Groups with at least one positive and one negative response."""
    has_pos = {g for g, p in zip(group, positive, strict=True) if p}
    has_neg = {g for g, p in zip(group, positive, strict=True) if not p}
    return has_pos & has_neg


class InlineWeights:
    """ResRL weights of the mixed groups that the update's micro-batches hold whole, formed from the
    micro-batch's own forward (`forward_logprobs(token_loss_fn=...)`): the subspace hidden states
    of that forward (detached) give the bases, distances and weights before the loss is taken.

    `groups`: the mixed groups this path owns (whole in one micro-batch of the update's plan); the
    pre-pass weighs every other mixed group."""

    def __init__(
        self,
        positive: list[bool],
        group: list[int],
        groups: set[int],
        algo: AlgorithmConfig,
        seed: int,
        stats: WeightStats,
    ) -> None:
        self.positive, self.group, self.groups = positive, group, groups
        self.algo, self.seed, self.stats = algo, seed, stats

    def wants(self, idx: list[int]) -> bool:
        """Whether the micro-batch `idx` holds a group of this path (its forward must capture)."""
        return any(self.group[i] in self.groups for i in idx)

    def weights(
        self, idx: list[int], sub_hidden_MD: torch.Tensor, lengths: list[int], weight_bT: torch.Tensor | None
    ) -> torch.Tensor:
        """The micro-batch's ResRL weights [b, T]: `weight_bT` (the pre-pass's, or 1) with the rows of
        this path's groups replaced. `sub_hidden_MD`: the response rows' subspace hidden states,
        sequence after sequence (`lengths` tokens each, in the order of `idx`)."""
        present = {self.group[i] for i in idx} & self.groups
        members = {i for i in idx if self.group[i] in present}
        expected = {i for i in range(len(self.group)) if self.group[i] in present}
        if members != expected:
            raise RuntimeError(
                "InlineWeights: a micro-batch holds part of a group weighted in the update "
                "(the micro-batch plan is not group-aligned)"
            )
        self.stats.groups_mixed += len(present)
        self.stats.groups_in_update += len(present)
        hidden = {
            i: h for i, h in zip(idx, sub_hidden_MD.split(lengths), strict=True) if self.group[i] in present
        }
        found = weigh_groups(hidden, self.positive, self.group, present, self.algo, self.seed, self.stats)
        t_max = max(max(lengths), 1)
        out_bT = (
            weight_bT.clone()
            if weight_bT is not None
            else torch.ones(len(idx), t_max, dtype=torch.float32, device=sub_hidden_MD.device)
        )
        for row, i in enumerate(idx):
            if i in found:
                out_bT[row, : lengths[row]] = found[i].to(out_bT.device)
            elif i in members:
                # A group that got no basis (too few positive tokens): weight 1, as in the pre-pass.
                out_bT[row, : lengths[row]] = 1.0
        return out_bT


def plan_weights(
    batch, algo: AlgorithmConfig, train, *, need_old: bool, seed: int, stats: WeightStats
) -> tuple[InlineWeights | None, set[int] | None]:
    """Which path weighs each mixed group of this rank's `batch` (a `RolloutBatch`) for the loss
    settings `algo` and micro-batching `train` (a `TrainConfig`): (the update's `InlineWeights` or
    None, the groups the pre-pass weighs or None for all). The update's forward takes the groups
    one of its micro-batches holds whole (the plan of `RolloutBatch.group_micro_batches`, which
    `optimizer_step` follows), when the update is on-policy (`need_old` false: the pre-pass runs
    for old log-probs anyway otherwise) and `algorithm.resrl_weights` is auto."""
    if algo.objective != "resrl" or need_old or algo.resrl_weights != "auto":
        return None, None
    positive, group = batch.positive.tolist(), batch.group.tolist()
    mixed = mixed_groups(positive, group)
    budget = train.max_tokens_per_micro_batch if train.pack else 0
    _, whole = batch.group_micro_batches(list(range(len(batch))), train.micro_batch_size, budget)
    inline = InlineWeights(positive, group, mixed & whole, algo, seed, stats)
    return inline, mixed - whole
