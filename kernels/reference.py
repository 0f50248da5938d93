"""Naive reference implementations of every kernel.

These are the test oracle and the benchmark baseline. They favour clarity over memory:
`linear_logprob_reference` materializes the full [N, V] logits. Run them in float64 for a
ground truth (pass float64 tensors; every op here keeps the input dtype unless noted).
"""

from __future__ import annotations

import torch

LN_EPS = 1e-5


def linear_logprob_reference(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    target: torch.Tensor,  # [N] int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-logits log-softmax at `target` and the entropy; differentiable by autograd.

    Computes in float32 for bf16/fp16/fp32 inputs and in float64 for float64 inputs.
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits_NV = (hidden.to(compute) @ weight.to(compute).T) / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    logprob_N = logp_NV.gather(1, target.view(-1, 1)).squeeze(1)
    entropy_N = None
    if return_entropy:
        entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logprob_N, entropy_N


def linear_logprob_two_part_reference(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    hidden2: torch.Tensor,  # [N, D2]
    weight2: torch.Tensor,  # [V, D2]
    target: torch.Tensor,  # [N] int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two-part logits h·Wᵀ + h2·W2ᵀ as the concatenated one-part form [h | h2]·[W | W2]ᵀ.

    Builds the [N, D+D2] and [V, D+D2] concatenations (and the full logits); autograd splits the
    gradients back through `cat`."""
    return linear_logprob_reference(
        torch.cat([hidden, hidden2], -1),
        torch.cat([weight, weight2], -1),
        target,
        temperature=temperature,
        return_entropy=return_entropy,
    )


def layer_norm_no_affine(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the last dim with biased variance, at least float32."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS)


def subsample_indices(m: int, max_tokens: int, generator: torch.Generator | None) -> torch.Tensor | None:
    """Indices of a uniform random subset of size `max_tokens` of range(m), or None if m fits.

    Shared by the reference and the fast path so both see the same pool for the same generator.
    """
    if m <= max_tokens:
        return None
    return torch.randperm(m, generator=generator)[:max_tokens]


def subspace_basis_reference(
    pos_hidden: torch.Tensor,  # [M, D]
    *,
    rank: int = 64,
    max_tokens: int = 4096,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-SVD basis of the centered, LayerNormed positive pool: (basis [D, k], mean [D]).

    k = min(rank, M' - 1, D, numerical rank) where M' is the pool size after subsampling.
    """
    pool = layer_norm_no_affine(pos_hidden)
    idx = subsample_indices(pool.shape[0], max_tokens, generator)
    if idx is not None:
        pool = pool[idx.to(pool.device)]
    mean_D = pool.mean(0)
    m, d = pool.shape
    _, s, vh = torch.linalg.svd(pool - mean_D, full_matrices=False)
    k = min(rank, m - 1, d, numerical_rank(s, m, d))
    return vh[:k].T.contiguous(), mean_D


def numerical_rank(singular_values: torch.Tensor, m: int, d: int) -> int:
    """Singular values above s_max * max(m, d) * eps(fp32) (torch.linalg.matrix_rank's default
    tolerance, at fp32 rounding whatever the dtype: the kernels compute in fp32)."""
    if singular_values.numel() == 0:
        return 0
    tol = float(singular_values.max()) * max(m, d) * torch.finfo(torch.float32).eps
    return int((singular_values > tol).sum())


def subspace_residual_reference(
    hidden: torch.Tensor,  # [N, D]
    basis: torch.Tensor,  # [G, D, k] or [D, k]
    mean: torch.Tensor,  # [G, D] or [D]
    group_index: torch.Tensor | None = None,  # [N] int64
) -> torch.Tensor:
    """‖(I − V Vᵀ)(LN(h) − μ)‖² / D per token, with each token's group basis (explicit projection)."""
    z = layer_norm_no_affine(hidden)
    if basis.dim() == 2:
        basis, mean = basis.unsqueeze(0), mean.unsqueeze(0)
        group_index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    basis_NDk = basis.to(z.dtype)[group_index]
    z = z - mean.to(z.dtype)[group_index]
    proj = torch.einsum("ndk,nd->nk", basis_NDk, z)
    resid = z - torch.einsum("ndk,nk->nd", basis_NDk, proj)
    return (resid**2).sum(-1) / hidden.shape[1]


def residual_weights_reference(
    dist: torch.Tensor,  # [N]
    group_index: torch.Tensor,  # [N] int64
    valid: torch.Tensor,  # [N] bool
    *,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_weight: float = 0.1,
) -> torch.Tensor:
    """Per-group quantile normalization of distances (ALGORITHMS.md §4.6), one group at a time."""
    weight = torch.ones_like(dist, dtype=torch.float32)
    for g in torch.unique(group_index[valid]).tolist():
        sel = valid & (group_index == g)
        d = dist[sel].double()
        lo = torch.quantile(d, q_low)
        hi = torch.quantile(d, q_high)
        if hi - lo < 1e-5:
            w = torch.full_like(d, (1.0 + min_weight) / 2)
        else:
            w = min_weight + (1.0 - min_weight) * ((d - lo) / (hi - lo)).clamp(0.0, 1.0)
        weight[sel] = w.float()
    return weight
