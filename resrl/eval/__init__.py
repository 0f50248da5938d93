"""Evaluation: metrics over sampled responses, the evaluation runner, diversity, pass@k plots."""

from resrl.eval.diversity import (
    distinct_answers,
    distinct_correct_answers,
    distinct_correct_solutions,
    diversity_metrics,
)
from resrl.eval.evaluate import EvalResult, canonical_answer, evaluate
from resrl.eval.metrics import avg_at_n, maj_at_k, pass_at_k, summarize
from resrl.eval.plot import load_curve, plot_pass_at_k

__all__ = [
    "EvalResult",
    "avg_at_n",
    "canonical_answer",
    "distinct_answers",
    "distinct_correct_answers",
    "distinct_correct_solutions",
    "diversity_metrics",
    "evaluate",
    "load_curve",
    "maj_at_k",
    "pass_at_k",
    "plot_pass_at_k",
    "summarize",
]
