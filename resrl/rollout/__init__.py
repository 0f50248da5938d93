"""Rollout engines: sample G responses per prompt and return their tokens and sampling log-probs.

Every engine implements `RolloutEngine`; the trainer and the evaluator only use this interface, so
`hf` (transformers `generate`, the dependency-free default) and `vllm` are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

ENGINES = ("hf", "vllm")


@dataclass
class Sample:
    """One sampled response.

    `response_ids` are the generated tokens, the stop token included when the model emitted one
    (the tokenizer's EOS, or another end-of-sequence id the checkpoint's generation_config lists;
    the policy must learn to stop, so it is trained like any other token); padding is never
    included.
    `logprobs[t]` is the sampling log-prob of `response_ids[t]` under the distribution actually
    sampled from (logits / temperature, after top-p), in fp32. `truncated` is True when generation
    hit `max_new_tokens` without a stop token.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    truncated: bool
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy (then `logprobs` are those of the plain softmax).
    `rollout_head`: sample from R²PO's π_roll (the policy's logits plus the residual of the head
    last given to `RolloutEngine.sync_head`), and record its log-probs; evaluation never sets it."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    rollout_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (samples per prompt) must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """`params.n` samples for each prompt (token ids, no padding): result[i][j] is sample j of prompt i.

        Deterministic for a fixed `params.seed` (and fixed weights), independent of global RNG state.
        """
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""
        ...

    def sync_head(self, head: torch.nn.Module) -> None:
        """Make `SamplingParams(rollout_head=True)` sample from π_roll with `head`'s current weights
        (a `resrl.rollout_head.RolloutHead`; after its optimizer step). Leaves the policy's weights."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds on the accelerator (KV cache, weights) while the trainer
        updates; `generate` and `sync_weights` need `wake_up` first. A no-op where nothing is held."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Undo `sleep` for `tags` ("weights", "kv_cache"; None: both). Waking the KV cache empties
        the prefix cache: its blocks were computed with the weights from before the update."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


def checkpoint_stop_ids(model: torch.nn.Module) -> list[int]:
    """The end-of-sequence ids a checkpoint's generation_config lists (Qwen3: <|im_end|> and
    <|endoftext|>), within the vocabulary; the engines stop at these besides the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    vocab = model.get_input_embeddings().num_embeddings
    return [int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab]


def check_stop_ids(eos_id: int, stop_ids, vocab_size: int) -> tuple[int, ...]:
    """The tokenizer's EOS first, then the other `stop_ids` (deduplicated), validated."""
    out = [eos_id]
    for i in stop_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"stop id {i!r} is not a token id; accepted: ints in [0, {vocab_size})")
        if i not in out:
            out.append(i)
    return tuple(out)


def first_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> int:
    """1 + the position of the first stop token in `tokens`, or 0 when there is none."""
    for pos, token in enumerate(tokens):
        if token in stop_ids:
            return pos + 1
    return 0


def free_cached_memory(device: torch.device) -> None:
    """Return the caching allocator's unused blocks to the device (CUDA), e.g. the update's peak
    before the engine wakes; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_engine(
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Any,
    *,
    model_dir: str | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
    rollout_head: bool = False,
    dtype: torch.dtype | None = None,
    lora_rank: int = 0,
    adapter_dir: str | None = None,
    tokenizer_dir: str | None = None,
) -> RolloutEngine:
    """The rollout engine `name` sampling from `model` (`cfg`: the run's RolloutConfig).

    vllm needs `model_dir`, a Hugging Face folder of the policy to start from (weights are then
    streamed in by `sync_weights`), and `max_model_len` (prompt + response tokens).
    `rollout_head`: R²PO will sample from π_roll (`sync_head`, `SamplingParams.rollout_head`);
    vllm then serves π_roll's model class, hf needs nothing (it hooks the LM head per call).
    `dtype`: what vllm serves in (default: `model`'s parameters'; the trainer passes its compute
    dtype, since its parameters are fp32 master weights); hf generates with `model` as gathered.
    `lora_rank` > 0 (vllm): `model_dir` is the frozen base and the engine serves the adapter
    (`rollout.lora_serving=adapter`), written under `adapter_dir` at every sync; `tokenizer_dir`:
    where vllm reads the tokenizer (default `model_dir`).
    """
    if name == "hf":
        from resrl.rollout.hf import HFEngine

        return HFEngine(
            model, tokenizer, max_batch_size=cfg.max_batch_size, stop_ids=checkpoint_stop_ids(model)
        )
    if name == "vllm":
        from resrl.rollout.vllm_engine import VLLMEngine

        if model_dir is None or max_model_len is None:
            raise ValueError("the vllm engine needs model_dir (a Hugging Face folder) and max_model_len")
        return VLLMEngine(
            model,
            tokenizer,
            model_dir=model_dir,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            stop_ids=checkpoint_stop_ids(model),
            rollout_head=rollout_head,
            dtype=dtype,
            lora_rank=lora_rank,
            adapter_dir=adapter_dir,
            tokenizer_dir=tokenizer_dir,
        )
    raise ValueError(f"rollout engine {name!r} is not available; accepted: {', '.join(ENGINES)}")
