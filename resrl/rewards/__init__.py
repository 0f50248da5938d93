"""Verifiable rewards: answer extraction, time-limited math verification, length shaping, a registry."""

from resrl.rewards.extract import extract_answer
from resrl.rewards.registry import RewardFn, available_rewards, get_reward, register_reward
from resrl.rewards.shaping import length_scaled_reward
from resrl.rewards.verify import MAX_ANSWER_CHARS, shutdown_verifier, verify_answer

__all__ = [
    "MAX_ANSWER_CHARS",
    "RewardFn",
    "available_rewards",
    "extract_answer",
    "get_reward",
    "length_scaled_reward",
    "register_reward",
    "shutdown_verifier",
    "verify_answer",
]
