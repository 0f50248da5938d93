"""How one RL step's data and metrics are spread over the ranks and combined again.

Every rank samples its share of the step's prompts; `gather_rollouts` then gives every rank the
whole step (token ids and per-token floats: cheap next to the update), `plan_mini_batches` splits
each mini-batch into whole prompt groups per rank with balanced token counts, and the combiners
make the logged metrics those of the whole step at any number of processes. One process: each
function returns its input unchanged or the trivial plan.
"""

from __future__ import annotations

from resrl.batch import RolloutBatch, balance_groups
from resrl.distributed import World, all_gather_objects


def check_world(cfg, world: World) -> None:
    """Every rank samples and trains an equal share of whole prompt groups: the step's prompts and
    the mini-batch must divide by the number of processes (one-line ConfigError otherwise)."""
    from resrl.config import ConfigError

    if not world.distributed:
        return
    for key in ("prompts_per_step", "mini_batch_prompts"):
        if getattr(cfg.train, key) % world.size:
            raise ConfigError(
                f"config train.{key}={getattr(cfg.train, key)} must be a multiple of the {world.size} processes"
            )


def gather_rollouts(local: RolloutBatch, n_prompts: int, group_size: int, world: World) -> RolloutBatch:
    """Every rank's groups on every rank, in the order of the step's prompts: rank r sampled
    prompts r, r + size, ... (`group_size` sequences each)."""
    if not world.distributed:
        return local
    parts = all_gather_objects(local, world)
    g, size = group_size, world.size
    return RolloutBatch.concat(
        [parts[p % size].select(list(range((p // size) * g, (p // size + 1) * g))) for p in range(n_prompts)]
    )


def plan_mini_batches(
    tokens: list[int], order: list[int], mini_batch_prompts: int, world: World
) -> tuple[list[list[int]], float]:
    """This rank's prompt groups (positions into `tokens`, each group's token count) for each
    mini-batch, and the token imbalance across ranks (max / mean, 1 = even). The mini-batches are
    `order` cut `mini_batch_prompts` at a time; each is split over the ranks in equal numbers of
    groups with balanced tokens (`balance_groups`)."""
    plan, load = [], [0] * world.size
    for k in range(0, len(order), mini_batch_prompts):
        split = balance_groups(tokens, order[k : k + mini_batch_prompts], world.size)
        plan.append(split[world.rank])
        for r, groups in enumerate(split):
            load[r] += sum(tokens[p] for p in groups)
    return plan, max(load) / max(sum(load) / len(load), 1)


def rank_share(
    batch: RolloutBatch, seq_adv, order: list[int], mini_batch_prompts: int, world: World
) -> tuple[RolloutBatch, object, list[list[int]], float]:
    """This rank's share of a step: its whole prompt groups (`plan_mini_batches` over the groups'
    token counts, mini-batches cut from `order`), as (its sequences of `batch`, their `seq_adv`,
    its groups per mini-batch as positions in the returned batch, the token imbalance)."""
    g = len(batch) // len(order)
    tokens = [sum(batch.length(p * g + j) for j in range(g)) for p in range(len(order))]
    plan, imbalance = plan_mini_batches(tokens, order, mini_batch_prompts, world)
    mine = sorted(p for mb in plan for p in mb)
    position = {p: k for k, p in enumerate(mine)}
    rows = [p * g + j for p in mine for j in range(g)]
    return batch.select(rows), seq_adv[rows], [[position[p] for p in mb] for mb in plan], imbalance


def sum_over_ranks(sums: dict[str, float], world: World) -> dict[str, float]:
    """Metric sums of all ranks (token-weighted sums, counts): added, except the ratio extremes
    (`loss/ratio_max`, `loss/ratio_min`), which take the max / min."""
    if not world.distributed:
        return sums
    out: dict[str, float] = {}
    for part in all_gather_objects(sums, world):
        for k, v in part.items():
            if k not in out:
                out[k] = v
            elif k == "loss/ratio_max":
                out[k] = max(out[k], v)
            elif k == "loss/ratio_min":
                out[k] = min(out[k], v)
            else:
                out[k] = out[k] + v
    return out


def mean_over_ranks(metrics: dict[str, float], world: World) -> dict[str, float]:
    """The mean of each metric over the ranks that report it (step metrics already combined are
    equal on every rank; per-rank timings become their mean)."""
    if not world.distributed:
        return metrics
    gathered = all_gather_objects(metrics, world)
    keys = sorted({k for m in gathered for k in m})
    return {k: sum(m[k] for m in gathered if k in m) / sum(1 for m in gathered if k in m) for k in keys}
