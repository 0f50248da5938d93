"""Evaluation: metrics over sampled responses."""

from resrl.eval.metrics import avg_at_n, maj_at_k, pass_at_k, summarize

__all__ = ["avg_at_n", "maj_at_k", "pass_at_k", "summarize"]
