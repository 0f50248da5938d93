"""Reward functions by name. A reward maps (response, ground truth) to a float, given whether the
response was cut off at the length limit and the value a wrong response gets (0 or -1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from resrl.rewards.verify import verify_answer


class RewardFn(Protocol):
    def __call__(
        self, response: str, ground_truth: str, *, truncated: bool, negative_reward: float
    ) -> float: ...


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; registering a different function twice is an error."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({existing!r})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}") from None


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


@register_reward("math")
def math_reward(response: str, ground_truth: str, *, truncated: bool, negative_reward: float) -> float:
    """1.0 if the response finished and its final answer verifies, else ``negative_reward``.

    A truncated response is wrong whatever it contains: it was cut off before committing to an answer.
    """
    if (
        not isinstance(negative_reward, int | float)
        or not math.isfinite(negative_reward)
        or negative_reward > 0
    ):
        raise ValueError(
            f"negative_reward must be a finite number <= 0 (0 or -1 usually), got {negative_reward!r}"
        )
    if truncated:
        return float(negative_reward)
    return 1.0 if verify_answer(response, ground_truth) else float(negative_reward)
