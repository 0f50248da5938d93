"""Reward functions by name or by spec. A reward maps (response, ground truth) to a float, given
whether the response was cut off at the length limit and the value a wrong response gets (0 or -1).
A reward > 0 means the response is correct: the trainer's positive responses and evaluation's pass@k
both count it so.

``get_reward`` finds a registered name (``register_reward``) or loads the user's function a spec
names (``path/to/file.py:function``, ``package.module:function``; ``resrl.rewards.user``). A step
scores all its responses at once through ``get_batch_reward``: a reward registered with a batch
version (``math``: answers verified in a pool of worker processes) uses it; any other is called once
per distinct (response, ground truth, truncated, row), which assumes, as the trainer does everywhere,
that a reward is a function of its inputs.

Such a per-response function is called as ``fn(response, ground_truth, **keywords)`` with the
keywords it takes (all of them when it has ``**kwargs``) from ``truncated``, ``negative_reward`` and
the data row's fields (``Example.reward_fields``: ``data_source``, ``prompt``, ``solution`` and the
row's other columns such as verl's ``extra_info``). A function that does not take ``truncated`` is
not called for a truncated response, which gets ``negative_reward``, as everywhere else.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from resrl.errors import InputError
from resrl.rewards.user import is_spec, load_spec
from resrl.rewards.verify import DEFAULT_WORKERS, verify_answer, verify_batch

# The arguments every call gives; a row field of the same name is not passed.
_CALL_KEYWORDS = ("truncated", "negative_reward")
_RESERVED = ("response", "ground_truth", *_CALL_KEYWORDS)
# Characters of a prompt, answer or response quoted in an error message.
_QUOTE_CHARS = 60


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


class ScoreFn(Protocol):
    """What ``get_batch_reward`` gives: a batch reward that also takes each response's data row
    (an ``Example``, or a mapping of field names to values) for the rewards that want its fields."""

    def __call__(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        truncated: Sequence[bool],
        negative_reward: float,
        rows: Sequence[Any] | None = None,
    ) -> list[float]: ...


class RewardError(InputError):
    """A reward function that raised on a row or returned something that is not a reward: the
    message names the function, the row and what is accepted."""


_REGISTRY: dict[str, RewardFn] = {}
_BATCH: dict[str, BatchRewardFn] = {}


def register_reward(name: str, *, batch: BatchRewardFn | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; registering a different function twice is an error.

    ``batch``, optional, scores many responses at once and must give what ``fn`` gives for each
    (it is called without the rows).
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


def get_reward(name: str) -> Callable[..., Any]:
    """The reward registered as ``name``, else the function the spec ``name`` names (loaded once per
    process). InputError naming what is accepted when there is neither."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if is_spec(name):
        return load_spec(name)
    if isinstance(name, str) and name.strip().endswith(".py"):
        raise InputError(
            f"{name!r} names a file but not its function; accepted: {name.strip()}:FUNCTION, e.g. "
            f"{name.strip()}:reward"
        )
    raise InputError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")


def get_batch_reward(name: str) -> ScoreFn:
    """The reward ``name`` over lists: its registered batch version, else one call per distinct
    (response, ground truth, truncated, row) with the keywords the function takes."""
    fn = get_reward(name)
    if name in _BATCH:
        registered = _BATCH[name]

        def batch_of_registered(
            responses: Sequence[str],
            ground_truths: Sequence[str],
            *,
            truncated: Sequence[bool],
            negative_reward: float,
            rows: Sequence[Any] | None = None,
        ) -> list[float]:
            return registered(responses, ground_truths, truncated=truncated, negative_reward=negative_reward)

        return batch_of_registered
    call = _Caller(fn, name)

    def batch(
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        truncated: Sequence[bool],
        negative_reward: float,
        rows: Sequence[Any] | None = None,
    ) -> list[float]:
        _check_lengths(responses, ground_truths, truncated)
        if rows is not None and len(rows) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(rows)} rows: one row per response")
        seen: dict[tuple[str, str, bool, int], float] = {}
        out = []
        for i, key in enumerate(zip(responses, ground_truths, map(bool, truncated), strict=True)):
            row = None if rows is None else rows[i]
            # Rows are alive for the whole call, so their ids tell them apart.
            full_key = (*key, id(row))
            if full_key not in seen:
                seen[full_key] = call(*key, negative_reward, row, i)
            out.append(seen[full_key])
        return out

    return batch


class _Caller:
    """Calls a per-response reward with the keywords it takes, and checks what it returns."""

    def __init__(self, fn: Callable[..., Any], label: str) -> None:
        self.fn, self.label = fn, label
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            # No readable signature (some builtins): the registered convention.
            self.names, self.required, self.var_keyword = set(_CALL_KEYWORDS), set(), False
            return
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
        by_keyword = [
            p for p in params if p not in positional and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        self.names = {p.name for p in by_keyword}
        self.required = {p.name for p in by_keyword if p.default is p.empty}
        self.var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)

    def _takes(self, name: str) -> bool:
        return self.var_keyword or name in self.names

    def __call__(
        self,
        response: str,
        ground_truth: str,
        truncated: bool,
        negative_reward: float,
        row: Any,
        position: int,
    ) -> float:
        if truncated and not self._takes("truncated"):
            return float(negative_reward)
        offered = {k: v for k, v in _row_fields(row).items() if k not in _RESERVED}
        offered.update(truncated=truncated, negative_reward=negative_reward)
        kwargs = {k: v for k, v in offered.items() if self._takes(k)}
        missing = sorted(self.required - kwargs.keys())
        if missing:
            raise RewardError(
                f"reward {self.label} needs the keyword{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, which "
                f"{_where(row, ground_truth, response, position)} does not have; given: {', '.join(offered)}"
            )
        try:
            value = self.fn(response, ground_truth, **kwargs)
        except Exception as e:
            message = " ".join(str(e).split())
            raise RewardError(
                f"reward {self.label} raised {type(e).__name__}{': ' + message if message else ''} "
                f"on {_where(row, ground_truth, response, position)}"
            ) from e
        number = _finite(value)
        if number is None:
            raise RewardError(
                f"reward {self.label} returned {type(value).__name__} {_short(repr(value))} for "
                f"{_where(row, ground_truth, response, position)}; accepted: a finite int or float "
                "(> 0: correct)"
            )
        return number


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (numpy's too), not a bool; else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _row_fields(row: Any) -> dict[str, Any]:
    if row is None:
        return {}
    if hasattr(row, "reward_fields"):
        return row.reward_fields()
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"a row must be a resrl.data.Example or a mapping, got {type(row).__name__}")


def _short(text: str) -> str:
    return text[:_QUOTE_CHARS] + "..." if len(text) > _QUOTE_CHARS else text


def _quote(text: Any) -> str:
    return repr(_short(text if isinstance(text, str) else str(text)))


def _where(row: Any, ground_truth: str, response: str, position: int) -> str:
    """The row and response a reward failed on, in a few quoted words."""
    fields = _row_fields(row)
    parts = []
    if fields.get("data_source") is not None:
        parts.append(f"data_source {fields['data_source']!r}")
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], Mapping):
        prompt = prompt[-1].get("content")
    if prompt is not None:
        parts.append(f"prompt {_quote(prompt)}")
    parts.append(f"answer {_quote(ground_truth)}")
    index = getattr(row, "index", None)
    name = "row" if index is None else f"row index {index}"
    return f"{name} ({', '.join(parts)}), response {position} of the batch {_quote(response)}"


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
