"""Fused kernels for ResRL: LM-head log-prob/entropy without logits, subspace residual, weights.

Each public function dispatches to Triton on CUDA and to PyTorch elsewhere; the environment
variable `RESRL_KERNEL_IMPL` (`triton` or `torch`) overrides the choice. Naive oracles live in
`kernels.reference`.
"""

from kernels.fused_loss import linear_logprob_loss
from kernels.linear_logprob import linear_logprob
from kernels.subspace import residual_weights, subspace_basis, subspace_residual

__all__ = ["linear_logprob", "linear_logprob_loss", "residual_weights", "subspace_basis", "subspace_residual"]
