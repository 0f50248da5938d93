"""Evaluation metrics over n sampled responses per problem (ALGORITHMS.md §7)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no big binomials, stable for n in the thousands.
    """
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must satisfy 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n={n}, got {k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_n(correct: Sequence[bool]) -> float:
    """Mean per-sample accuracy."""
    if len(correct) == 0:
        raise ValueError("avg_at_n needs at least one sample")
    return sum(bool(x) for x in correct) / len(correct)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the plurality answer among the first ``k`` samples is correct, else 0.0.

    Answers are compared as given (canonicalize them first if "0.5" and "1/2" should pool). Ties go
    to the answer seen first; None (no answer) never wins, and all-None scores 0. The winner's
    correctness is that of its first occurrence.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    k = _count("k", k)
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must satisfy 1 <= k <= {len(answers)} (samples given), got {k}")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers[:k]):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not counts:
        return 0.0
    # dicts keep insertion order and max() returns the first maximum: ties go to the earliest answer.
    winner = max(counts, key=counts.__getitem__)
    return 1.0 if correct[first[winner]] else 0.0


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def _check_row(i: int, row: Any) -> int:
    if not isinstance(row, dict):
        raise TypeError(f"per_problem[{i}] must be a dict, got {type(row).__name__}")
    for key in ("n", "c", "answers", "correct"):
        if key not in row:
            raise ValueError(f"per_problem[{i}] lacks {key!r}; rows need n, c, answers, correct")
    n, c = _count(f"per_problem[{i}]['n']", row["n"]), _count(f"per_problem[{i}]['c']", row["c"])
    if len(row["correct"]) != n or len(row["answers"]) != n:
        raise ValueError(
            f"per_problem[{i}]: n={n} but {len(row['correct'])} correct flags and {len(row['answers'])} answers"
        )
    if sum(bool(x) for x in row["correct"]) != c:
        raise ValueError(
            f"per_problem[{i}]: c={c} but {sum(bool(x) for x in row['correct'])} correct flags are set"
        )
    return n


def _summarize(rows: list[dict], n: int) -> dict[str, float]:
    out = {f"pass@{k}": sum(pass_at_k(r["n"], r["c"], k) for r in rows) / len(rows) for k in _ks(n)}
    out[f"avg@{n}"] = sum(avg_at_n(r["correct"]) for r in rows) / len(rows)
    out[f"maj@{n}"] = sum(maj_at_k(r["answers"], r["correct"], n) for r in rows) / len(rows)
    return out


def summarize(per_problem: list[dict]) -> dict[str, float]:
    """Mean pass@k (k = 1, 2, 4, ... <= n, and n), avg@n and maj@n over problems.

    Every row needs the same n. With more than one ``data_source`` the same metrics are added per
    source under ``"<source>/pass@1"`` etc.
    """
    if not per_problem:
        raise ValueError("summarize needs at least one problem")
    ns = {_check_row(i, row) for i, row in enumerate(per_problem)}
    if len(ns) != 1:
        raise ValueError(f"all problems must have the same number of samples n, got {sorted(ns)}")
    n = ns.pop()
    out = _summarize(per_problem, n)
    by_source: dict[str, list[dict]] = {}
    for row in per_problem:
        by_source.setdefault(str(row.get("data_source", "unknown")), []).append(row)
    if len(by_source) > 1:
        for source, rows in sorted(by_source.items()):
            out.update({f"{source}/{key}": value for key, value in _summarize(rows, n).items()})
    return out
