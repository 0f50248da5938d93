"""R²PO's residual rollout head (ALGORITHMS.md §5): π_roll's logits are the policy's plus a residual.

    logits_roll(h) = W h + W₂ ReLU(W₁ h)        W the LM head [V, D], W₁ [D, D], W₂ [V, D]

h is the final normed hidden state that feeds the LM head. The head is used only to sample the
training rollouts (and is trained, in R²PO's stage A, on them); evaluation and exports are π_θ.
It is a sibling of the Hugging Face model inside `resrl.distributed.Policy` (never inside it), so
`policy.model`'s parameters, `save_pretrained` and the rollout engines' weight streaming never see
it, and checkpoints do.

π_roll's log-prob at the targets goes through the two-part fused LM head
(`kernels.linear_logprob(h, W, target, hidden2=ReLU(W₁h), weight2=W₂)`): no [N, V] logits and no
[V, 2D] weight copy; with W and h detached (stage A) only W₁'s and W₂'s gradients are computed.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels


class RolloutHead(nn.Module):
    """W₁ [D, D] (`layer1`) and W₂ [V, D] (`layer2`), no biases (the reference's names, so its
    checkpoints stay legible). Parameters are kept in fp32 whatever the policy's dtype: Adam steps
    of about lr on weights that start at 1e-6 need the mantissa; the forward casts to the hidden
    states' dtype."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        # nn.Linear's default init draws from the global RNG: forked, so adding a head changes no
        # other random stream of the run (`reset` sets the weights from the head's own seed).
        with torch.random.fork_rng(devices=[]):
            self.layer1 = nn.Linear(hidden_size, hidden_size, bias=False, dtype=torch.float32)
            self.layer2 = nn.Linear(hidden_size, vocab_size, bias=False, dtype=torch.float32)

    @classmethod
    def for_model(cls, model: nn.Module, std: float, seed: int) -> RolloutHead:
        """A head for a causal LM (its LM head's [V, D]), reset to N(0, std²) from `seed`."""
        v, d = model.get_output_embeddings().weight.shape
        return cls(d, v).reset(std, seed)

    @torch.no_grad()
    def reset(self, std: float, seed: int) -> RolloutHead:
        """W₁, W₂ ~ N(0, std²) from their own generator (0 gives an exact zero head: π_roll = π_θ)."""
        gen = torch.Generator().manual_seed(seed)
        for layer in (self.layer1, self.layer2):
            w = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float32) * std
            layer.weight.copy_(w.to(layer.weight.device))
        return self

    def inner(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """ReLU(W₁ h) [N, D] in h's dtype: the second part's input."""
        return torch.relu(hidden_ND @ self.layer1.weight.to(hidden_ND.dtype).t())

    def residual(self, hidden: torch.Tensor) -> torch.Tensor:
        """W₂ ReLU(W₁ h) [..., V] in fp32: what sampling adds to the policy's logits (generation
        only, where every parameter is whole; never used for training log-probs)."""
        h = hidden.float()
        return torch.relu(h @ self.layer1.weight.float().t()) @ self.layer2.weight.float().t()

    def forward(
        self,
        hidden_ND: torch.Tensor,
        weight_VD: torch.Tensor,
        target_N: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """π_roll's (log-prob [N] fp32, entropy [N] fp32 or None) at the targets, through the
        two-part fused LM head. Detach `hidden_ND` and `weight_VD` to train the head alone."""
        return kernels.linear_logprob(
            hidden_ND,
            weight_VD,
            target_N,
            temperature=temperature,
            return_entropy=return_entropy,
            hidden2=self.inner(hidden_ND),
            weight2=self.layer2.weight.to(hidden_ND.dtype),
        )

    def norms(self) -> dict[str, float]:
        """Frobenius norms of W₁ and W₂ (the `r2po/head_w*_norm` metrics); collective under FSDP2."""
        out = {}
        for name, layer in (("w1", self.layer1), ("w2", self.layer2)):
            w = layer.weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w
            out[f"r2po/head_{name}_norm"] = float(w.detach().float().norm())
        return out
