"""Verifiable rewards: answer extraction, time-limited math verification, length shaping, a registry,
and the user's own reward function named by a spec (``path/to/file.py:function``)."""

from resrl.rewards.extract import extract_answer
from resrl.rewards.registry import (
    BatchRewardFn,
    RewardError,
    RewardFn,
    ScoreFn,
    available_rewards,
    get_batch_reward,
    get_reward,
    register_reward,
)
from resrl.rewards.shaping import length_scaled_reward, score_responses
from resrl.rewards.verify import (
    MAX_ANSWER_CHARS,
    BatchVerdicts,
    shutdown_verifier,
    verify_answer,
    verify_batch,
)

__all__ = [
    "MAX_ANSWER_CHARS",
    "BatchRewardFn",
    "BatchVerdicts",
    "RewardError",
    "RewardFn",
    "ScoreFn",
    "available_rewards",
    "extract_answer",
    "get_batch_reward",
    "get_reward",
    "length_scaled_reward",
    "register_reward",
    "score_responses",
    "shutdown_verifier",
    "verify_answer",
    "verify_batch",
]
