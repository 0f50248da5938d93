"""Diversity of sampled responses per problem (ALGORITHMS.md §7), averaged over problems.

Definitions, for one problem's n samples (a row of ``resrl.eval.evaluate``):

* ``distinct_correct_solutions``: the number of distinct *correct* response texts after whitespace
  normalization (runs of whitespace become one space, ends stripped), i.e. distinct solution paths.
  The headline diversity number: single-answer math has one right answer but many ways to reach it.
* ``distinct_correct_answers``: the number of distinct canonical final answers among correct
  samples. For single-answer problems this is 0 or 1 (it is the fraction solved at least once);
  it exceeds 1 only for problems that accept several answers.
* ``distinct_answers``: the number of distinct canonical final answers among all samples, wrong
  ones included; samples with no answer (None) are not counted.

A problem with no correct sample counts as 0 in the first two. Each metric is the mean over problems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def normalize_solution(text: str) -> str:
    """Whitespace-normalized response text: what counts as the same solution path."""
    return " ".join(text.split())


def _rows(rows: Sequence[dict], keys: tuple[str, ...]) -> Sequence[dict]:
    if not rows:
        raise ValueError("diversity metrics need at least one problem row")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        for key in keys:
            if key not in row:
                raise ValueError(f"rows[{i}] lacks {key!r}; diversity rows need {', '.join(keys)}")
        lengths = {key: len(row[key]) for key in keys}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"rows[{i}]: per-sample lists differ in length: {lengths}")
    return rows


def _mean_distinct(rows: Sequence[dict], keys: tuple[str, ...], items: Callable[[dict], Any]) -> float:
    rows = _rows(rows, keys)
    return sum(len(set(items(row))) for row in rows) / len(rows)


def distinct_correct_solutions(rows: Sequence[dict]) -> float:
    """Mean over problems of the number of distinct whitespace-normalized correct response texts."""
    return _mean_distinct(
        rows,
        ("responses", "correct"),
        lambda row: (
            normalize_solution(t) for t, ok in zip(row["responses"], row["correct"], strict=True) if ok
        ),
    )


def distinct_correct_answers(rows: Sequence[dict]) -> float:
    """Mean over problems of the number of distinct final answers among correct samples."""
    return _mean_distinct(
        rows,
        ("answers", "correct"),
        lambda row: (a for a, ok in zip(row["answers"], row["correct"], strict=True) if ok and a is not None),
    )


def distinct_answers(rows: Sequence[dict]) -> float:
    """Mean over problems of the number of distinct final answers, right or wrong (None excluded)."""
    return _mean_distinct(rows, ("answers",), lambda row: (a for a in row["answers"] if a is not None))


def diversity_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """All three diversity metrics (see the module docstring) keyed by name."""
    return {
        "distinct_correct_solutions": distinct_correct_solutions(rows),
        "distinct_correct_answers": distinct_correct_answers(rows),
        "distinct_answers": distinct_answers(rows),
    }
