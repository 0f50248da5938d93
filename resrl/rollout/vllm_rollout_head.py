"""R²PO's π_roll inside vLLM: the checkpoint's own vLLM model class plus the rollout head's residual.

    logits_roll(h) = W h + W₂ ReLU(W₁ h)        (ALGORITHMS.md §5, `resrl.rollout_head`)

A subclass of vLLM's class for the checkpoint's architecture (`ARCHITECTURES`) overrides
`compute_logits` only: super() gives W h, and while the head is on the residual is added in fp32.
vLLM calls `compute_logits` eagerly after the (compiled / CUDA-graph) trunk forward, and its
sampler takes the processed log-probs (temperature, top-p) from those logits, so `Sample.logprobs`
are π_roll's. The KV cache does not depend on the head: switching it on or off, or syncing it,
needs no prefix-cache reset. The class is registered under `registered_name(arch)` and selected
with `LLM(hf_overrides={"architectures": [name]})`, so the exported folder stays a plain HF folder.

Why W₁ and W₂ are plain tensor attributes (zeros from `__init__`), not parameters or buffers: the
first load requires every parameter to be in the checkpoint; `AutoWeightsLoader` rejects names it
does not know; and vLLM's in-place `reload_weights` tracks parameters and buffers layer by layer,
so a head layer would be reported as not loaded on every policy-only sync. As plain attributes a
policy sync never touches them, and `set_head` (a direct `copy_`) never touches the policy.

Limits: tensor parallelism 1 (the residual is over the full vocabulary), which is how resrl runs
vLLM; speculative decoding's draft path (`get_top_tokens`) and batch-sharded sampling
(`compute_logits_local`, Llama) bypass `compute_logits`, so the latter is refused while the head
is on. This module imports vllm; `resrl.rollout.vllm_engine` imports it only for
`VLLMEngine(rollout_head=True)`.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import ModelRegistry
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

_PREFIX = "ResRLRolloutHead"


class _RolloutHeadMixin:
    """π_roll on top of a vLLM causal-LM class; the head starts as zeros and switched off."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        d, v = int(config.hidden_size), int(config.vocab_size)
        # fp32 whatever the model dtype: the trainer's head parameters are fp32 and a residual of
        # 1e-3..1e-1 vanishes in bf16 logits (spacing 0.125 at a logit of 20). Allocated on the
        # default device vLLM builds the model under, so sleep mode (CUDA) offloads and restores
        # them with the weights (untested: no GPU vLLM here).
        self.rollout_head_w1 = torch.zeros(d, d, dtype=torch.float32)  # [D, D]
        self.rollout_head_w2 = torch.zeros(v, d, dtype=torch.float32)  # [V, D]
        self.rollout_head_on = False

    def compute_logits(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        # *args: vLLM releases before 0.32 pass sampling_metadata here.
        logits = super().compute_logits(hidden_states, *args, **kwargs)
        if not self.rollout_head_on or logits is None:
            return logits
        h_ND = hidden_states.float()
        residual_NV = torch.relu(h_ND @ self.rollout_head_w1.t()) @ self.rollout_head_w2.t()
        return logits.float() + residual_NV


class RolloutHeadQwen3ForCausalLM(_RolloutHeadMixin, Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM sampling π_roll while `rollout_head_on`."""


class RolloutHeadQwen2ForCausalLM(_RolloutHeadMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM sampling π_roll while `rollout_head_on`."""


class RolloutHeadLlamaForCausalLM(_RolloutHeadMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM sampling π_roll while `rollout_head_on`."""

    # Llama also offers batch-sharded sampling (vLLM checks `hasattr(model, "compute_logits_local")`,
    # so the override lives here, not in the mixin): it would bypass `compute_logits`.
    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.rollout_head_on:
            raise RuntimeError(
                "batch-sharded sampling (compute_logits_local) bypasses R²PO's rollout head; "
                "run the engine without enable_batch_sharded_sampling"
            )
        return super().compute_logits_local(hidden_states)


ARCHITECTURES: dict[str, type] = {
    "Qwen3ForCausalLM": RolloutHeadQwen3ForCausalLM,
    "Qwen2ForCausalLM": RolloutHeadQwen2ForCausalLM,
    "LlamaForCausalLM": RolloutHeadLlamaForCausalLM,
}


def registered_name(architecture: str) -> str:
    """Register π_roll's class for a checkpoint `architecture` with vLLM and return its name.

    Registering again overwrites the same entry with the same class (vLLM allows it).
    """
    cls = ARCHITECTURES.get(architecture)
    if cls is None:
        raise ValueError(
            f"rollout_head=True: architecture {architecture!r} has no π_roll class; accepted: "
            f"{', '.join(ARCHITECTURES)}"
        )
    name = _PREFIX + architecture
    ModelRegistry.register_model(name, cls)
    return name


def _model(worker: Any) -> Any:
    model = worker.model_runner.get_model()
    if not isinstance(model, _RolloutHeadMixin):
        raise RuntimeError(
            f"the engine's model is {type(model).__name__}, not a π_roll class: build it with rollout_head=True"
        )
    return model


def set_head(worker: Any, w1_DD: torch.Tensor, w2_VD: torch.Tensor) -> None:
    """Runs on the engine's worker (`collective_rpc`): copy W₁ and W₂ into the model's head."""
    model = _model(worker)
    pairs = (("W1", w1_DD, model.rollout_head_w1), ("W2", w2_VD, model.rollout_head_w2))
    # Both shapes first, so a bad head leaves the engine's head whole (copy_ would also broadcast).
    for name, src, dst in pairs:
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"rollout head {name} has shape {tuple(src.shape)}; the engine's model needs {tuple(dst.shape)}"
            )
    with torch.no_grad():
        for _, src, dst in pairs:
            dst.copy_(src)


def set_head_on(worker: Any, on: bool) -> None:
    """Runs on the engine's worker (`collective_rpc`): switch π_roll on or off."""
    _model(worker).rollout_head_on = bool(on)
