"""Reward functions by name. A reward maps (response, ground truth) to a float, given whether the
response was cut off at the length limit and the value a wrong response gets (0 or -1).

A step scores all its responses at once through ``get_batch_reward``: a reward registered with a
batch version (``math``: answers verified in a pool of worker processes) uses it; any other is
called once per distinct (response, ground truth, truncated), which assumes, as the trainer does
everywhere, that a reward is a function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from resrl.errors import InputError
from resrl.rewards.verify import DEFAULT_WORKERS, verify_answer, verify_batch


class RewardFn(Protocol):
    def __call__(
        self, response: str, ground_truth: str, *, truncated: bool, negative_reward: float
    ) -> float: ...


class BatchRewardFn(Protocol):
    def __call__(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        truncated: Sequence[bool],
        negative_reward: float,
    ) -> list[float]: ...


_REGISTRY: dict[str, RewardFn] = {}
_BATCH: dict[str, BatchRewardFn] = {}


def register_reward(name: str, *, batch: BatchRewardFn | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; registering a different function twice is an error.

    ``batch``, optional, scores many responses at once and must give what ``fn`` gives for each.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")
    if batch is not None and not callable(batch):
        raise TypeError(f"batch reward {name!r} must be callable, got {type(batch).__name__}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({existing!r})")
        _REGISTRY[name] = fn
        if batch is not None:
            _BATCH[name] = batch
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}") from None


def get_batch_reward(name: str) -> BatchRewardFn:
    """The reward ``name`` over lists: its registered batch version, else one call per distinct
    (response, ground truth, truncated)."""
    fn = get_reward(name)
    if name in _BATCH:
        return _BATCH[name]

    def batch(
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        truncated: Sequence[bool],
        negative_reward: float,
    ) -> list[float]:
        _check_lengths(responses, ground_truths, truncated)
        seen: dict[tuple[str, str, bool], float] = {}
        out = []
        for key in zip(responses, ground_truths, map(bool, truncated), strict=True):
            if key not in seen:
                seen[key] = float(fn(key[0], key[1], truncated=key[2], negative_reward=negative_reward))
            out.append(seen[key])
        return out

    return batch


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _check_lengths(responses: Sequence, ground_truths: Sequence, truncated: Sequence) -> None:
    if not len(responses) == len(ground_truths) == len(truncated):
        raise ValueError(
            f"{len(responses)} responses, {len(ground_truths)} ground truths and {len(truncated)} "
            "truncation flags: one of each per response"
        )


def _check_negative_reward(negative_reward: float) -> None:
    if (
        not isinstance(negative_reward, int | float)
        or not math.isfinite(negative_reward)
        or negative_reward > 0
    ):
        raise ValueError(
            f"negative_reward must be a finite number <= 0 (0 or -1 usually), got {negative_reward!r}"
        )


def math_rewards(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    truncated: Sequence[bool],
    negative_reward: float,
    workers: int = DEFAULT_WORKERS,
    timeout_s: float = 2.0,
) -> list[float]:
    """``math_reward`` of every response, verified together (``verify_batch``: identical answers
    once, math-verify in up to ``workers`` processes at a time, ``timeout_s`` per answer)."""
    _check_negative_reward(negative_reward)
    _check_lengths(responses, ground_truths, truncated)
    finished = [i for i, cut in enumerate(truncated) if not cut]
    verdicts = verify_batch(
        [responses[i] for i in finished],
        [ground_truths[i] for i in finished],
        workers=workers,
        timeout_s=timeout_s,
    ).verdicts
    out = [float(negative_reward)] * len(responses)
    for i, ok in zip(finished, verdicts, strict=True):
        if ok:
            out[i] = 1.0
    return out


@register_reward("math", batch=math_rewards)
def math_reward(response: str, ground_truth: str, *, truncated: bool, negative_reward: float) -> float:
    """1.0 if the response finished and its final answer verifies, else ``negative_reward``.

    A truncated response is wrong whatever it contains: it was cut off before committing to an answer.
    """
    _check_negative_reward(negative_reward)
    if truncated:
        return float(negative_reward)
    return 1.0 if verify_answer(response, ground_truth) else float(negative_reward)
