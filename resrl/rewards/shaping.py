"""ResRL's length-scaled positive reward (ALGORITHMS.md §1), and a step's responses scored with it."""

from __future__ import annotations

import math


def length_scaled_reward(
    reward: float, length: int, *, l0: int = 3500, lmax: int = 4096, scale: float = 0.7
) -> float:
    """Shrink a positive reward linearly from ``reward`` at ``l0`` tokens to ``reward * scale`` at ``lmax``.

    r' = r for L <= l0; r * (1 - (1 - s) * (L - l0) / (lmax - l0)) for l0 < L <= lmax; r * s beyond.
    Rewards <= 0 are returned unchanged (negative rewards are never length-scaled).
    """
    if not isinstance(reward, int | float) or isinstance(reward, bool) or not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"length must be a non-negative int (response tokens), got {length!r}")
    if not (isinstance(l0, int) and isinstance(lmax, int) and 0 <= l0 < lmax):
        raise ValueError(f"need integers 0 <= l0 < lmax, got l0={l0!r}, lmax={lmax!r}")
    if not (isinstance(scale, int | float) and 0.0 <= scale <= 1.0):
        raise ValueError(f"scale must lie in [0, 1], got {scale!r}")
    if reward <= 0 or length <= l0:
        return float(reward)
    if length <= lmax:
        return float(reward * (1.0 - (1.0 - scale) * (length - l0) / (lmax - l0)))
    return float(reward * scale)


def score_responses(
    samples, answers: list[str], reward_fn, algo, *, rows: list | None = None
) -> tuple[list[float], list[bool], list[float]]:
    """A step's responses (`samples[p][j]`, `resrl.rollout.Sample`s of prompt p, ground truth
    `answers[p]`) scored together by `reward_fn` (`get_batch_reward`'s: identical answers verified
    once, verifier processes in parallel): (rewards, positive, reward before length scaling), flat.
    `rows[p]`, when given, is prompt p's `Example`, whose fields a reward may take as keywords.
    `algo` (an AlgorithmConfig) gives the negative reward and the length scaling."""
    if rows is not None and len(rows) != len(samples):
        raise ValueError(f"{len(samples)} prompts' samples but {len(rows)} rows: one row per prompt")
    flat = [(s, answer) for group, answer in zip(samples, answers, strict=True) for s in group]
    scores = reward_fn(
        [s.text for s, _ in flat],
        [answer for _, answer in flat],
        truncated=[s.truncated for s, _ in flat],
        negative_reward=algo.negative_reward,
        rows=None if rows is None else [row for group, row in zip(samples, rows, strict=True) for _ in group],
    )
    rewards, positive, classes = [], [], []
    for (s, _), r in zip(flat, scores, strict=True):
        positive.append(r > 0)
        classes.append(r)
        if algo.length_reward:
            r = length_scaled_reward(
                r, len(s.response_ids), l0=algo.length_l0, lmax=algo.length_lmax, scale=algo.length_scale
            )
        rewards.append(r)
    return rewards, positive, classes
