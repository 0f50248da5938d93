"""A reward of your own, passed by path: no registration, no package.

    resrl train --preset tiny algorithm.reward=examples/my_reward.py:reward
    resrl eval --model runs/run/final --data held_out.jsonl --reward examples/my_reward.py:reward

resrl calls ``reward(response, ground_truth, ...)`` once per distinct response of a step, with the
keywords the function names: ``truncated`` (cut off at the length limit), ``negative_reward`` (what
a wrong response gets: ``algorithm.negative_reward`` in training, 0 in evaluation) and any field of
the data row (``data_source``, ``prompt``, ``solution``, verl's ``extra_info``, ...). It must return
a finite int or float; > 0 means correct (the trainer's positive responses, evaluation's pass@k).

This one grades the embedded arithmetic task (``data_source`` "arithmetic") with partial credit: a
right final answer gets 1; a wrong one gets ``negative_reward``, less of a penalty for each step of
the reference solution it got right, but never above 0, so it still counts as wrong (and in
evaluation, where ``negative_reward`` is 0, gets exactly 0). Rows from other sources are checked by
their final answer alone with the built-in math verifier.
"""

from resrl.rewards import extract_answer, verify_answer

# The share of the penalty that a wrong answer with every reference step right is spared.
STEP_CREDIT = 0.5


def reward(
    response: str,
    ground_truth: str,
    *,
    truncated: bool,
    negative_reward: float,
    data_source: str,
    solution: str | None = None,
) -> float:
    if truncated:
        # Cut off before committing to an answer: wrong, whatever it wrote.
        return negative_reward
    if data_source != "arithmetic":
        return 1.0 if verify_answer(response, ground_truth) else negative_reward
    if _integer(extract_answer(response)) == int(ground_truth):
        return 1.0
    return negative_reward * (1.0 - STEP_CREDIT * step_credit(response, solution))


def step_credit(response: str, solution: str | None) -> float:
    """The share of the reference solution's steps (``3+4=7`` lines) that the response writes."""
    if not solution:
        return 0.0
    steps = [line.strip() for line in solution.splitlines() if "=" in line]
    written = {line.strip() for line in response.splitlines()}
    return sum(step in written for step in steps) / len(steps) if steps else 0.0


def _integer(answer: str | None) -> int | None:
    try:
        return int(answer) if answer is not None else None
    except ValueError:
        return None
