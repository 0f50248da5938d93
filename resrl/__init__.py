"""resrl: a Triton-kernel RLVR trainer (ResRL, GRPO, Dr.GRPO, DAPO, PSR, NSR, W-REINFORCE)."""

__version__ = "0.1.0"
