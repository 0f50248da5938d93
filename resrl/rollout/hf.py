"""The `hf` rollout engine: transformers `model.generate` on the training model itself.

Slow but dependency-free: the default on CPU and in tests. Sampling runs on the very module the
trainer updates, so `sync_weights` copies nothing.

The sampling log-probs come from one logits processor (`_SampledLogprobs`) that does all of the
processing itself (logits / temperature, then top-p) and keeps the log-softmax of exactly the scores
`generate` then samples from; `generate`'s own warpers are switched off (temperature 1, top_k 0,
top_p 1). Custom processors run *before* transformers' warpers, so recording inside a processor
while transformers warps would see the wrong distribution. This keeps one [B, V] fp32 tensor per
step instead of `output_scores`' [steps, B, V] (80 GB for a 151k vocab, 256 rows, 512 tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from resrl.rollout import Sample, SamplingParams, check_stop_ids, first_stop


class _SampledLogprobs(LogitsProcessor):
    """Applies temperature and top-p, and records the log-prob of each sampled token under them.

    `generate` calls a processor with the ids so far and the next-token logits; it then samples from
    softmax(returned scores). So call k sees the token chosen after call k-1 as `input_ids[:, -1]`
    and gathers its log-prob from the log-softmax kept at call k-1; `finish` gathers the last one.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.warpers: list[LogitsProcessor] = []
        if temperature > 0 and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if temperature > 0 and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
        self.logp_prev_BV: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # each [B] fp32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.logp_prev_BV is not None:
            self.steps.append(self.logp_prev_BV.gather(1, input_ids[:, -1:]).squeeze(1))
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        self.logp_prev_BV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences_BL: torch.Tensor, n_new: int) -> torch.Tensor:
        """[B, n_new] log-probs of the last `n_new` tokens of `sequences_BL`.

        `generate` may run one step past the end and undo it (its deferred stop check, used on MPS
        in transformers 5.19), so the recorded steps can outnumber the tokens kept; only the first
        `n_new` are used.
        """
        if len(self.steps) < n_new:
            self.steps.append(self.logp_prev_BV.gather(1, sequences_BL[:, -1:]).squeeze(1))
        return torch.stack(self.steps[:n_new], dim=1)


def _chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for one chunk, a function of (seed, chunk index) only."""
    digest = hashlib.sha256(f"resrl-hf-rollout:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and `device`'s, restoring both (and nothing else) on exit."""
    devices = [] if device.type == "cpu" else [device]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[device.index].manual_seed(seed)
        elif device.type != "cpu":
            torch.get_device_module(device.type).manual_seed(seed)
        yield


class HFEngine:
    """`RolloutEngine` on transformers `generate`, sampling from the training model in place.

    `max_batch_size` bounds the rows (prompt x sample) per `generate` call. Results depend only on
    the weights, the prompts, `params` and `max_batch_size`: each chunk of rows is seeded from
    (`params.seed`, chunk index), and the global RNG state is left as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 256,
        stop_ids: Sequence[int] = (),
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"{type(model).__name__} has no `generate`; pass a transformers causal LM")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; the engine needs one to end responses")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.model: nn.Module | None = model
        self.head: nn.Module | None = None
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_id = int(eos)
        self.pad_id = self.eos_id if pad is None else int(pad)
        # Responses end at the tokenizer's EOS or at any other `stop_ids` (a checkpoint's extra
        # end-of-sequence ids); the stop token is kept in the response.
        self.stop_ids = check_stop_ids(self.eos_id, stop_ids, model.get_input_embeddings().num_embeddings)

    def sync_weights(self, model: nn.Module) -> None:
        """The engine samples from `model` itself: nothing to copy; a different module is rebound."""
        if model is not self.model:
            if not callable(getattr(model, "generate", None)):
                raise TypeError(f"{type(model).__name__} has no `generate`; pass a transformers causal LM")
            self.model = model

    def sync_head(self, head: nn.Module) -> None:
        """The engine samples with `head` itself (R²PO's rollout head): nothing to copy."""
        if not callable(getattr(head, "residual", None)):
            raise TypeError(f"{type(head).__name__} has no `residual`; pass a resrl.rollout_head.RolloutHead")
        self.head = head

    def sleep(self) -> None:
        """Nothing to free: the engine owns no memory besides the policy's."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Nothing to restore (see `sleep`)."""

    def close(self) -> None:
        """Drop the references to the model and tokenizer; the engine is unusable afterwards."""
        self.model = None
        self.tokenizer = None

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        model = self.model
        vocab = model.get_input_embeddings().num_embeddings
        max_pos = getattr(model.config, "max_position_embeddings", None)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list | tuple) or len(prompt) == 0:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary or not ints; "
                    f"accepted: ints in [0, {vocab})"
                )
            if max_pos is not None and len(prompt) + params.max_new_tokens > max_pos:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} = "
                    f"{len(prompt) + params.max_new_tokens}, beyond the model's max_position_embeddings={max_pos}"
                )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """`params.n` samples per prompt: result[i][j] is sample j of prompt i (see `RolloutEngine`)."""
        if self.model is None:
            raise RuntimeError("HFEngine.generate called after close()")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompts) == 0:
            return []
        self._check_prompts(prompts, params)
        if params.rollout_head and self.head is None:
            raise RuntimeError("SamplingParams(rollout_head=True) needs a head: call sync_head(head) first")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        out: list[list[Sample]] = [[] for _ in prompts]
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        # π_roll: the head's residual added to the LM head's output for this call only. The LM
        # head's input is the final normed h at the positions generate scores (the last one).
        hook = None
        if params.rollout_head:
            head = self.head
            lm_head = self.model.get_output_embeddings()
            hook = lm_head.register_forward_hook(
                lambda module, args, out: out.float() + head.residual(args[0]).to(out.device)
            )
        try:
            for c, start in enumerate(range(0, len(rows), self.max_batch_size)):
                chunk = rows[start : start + self.max_batch_size]
                samples = self._generate_chunk(
                    [prompts[i] for i, _ in chunk], params, _chunk_seed(params.seed, c)
                )
                for (i, _), sample in zip(chunk, samples, strict=True):
                    out[i].append(sample)
        finally:
            if hook is not None:
                hook.remove()
            for module, training in modes.items():
                module.training = training
        return out

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Sample]:
        model = self.model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids_BP = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids_BP[b, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask_BP[b, width - len(prompt) :] = 1
        sample = params.temperature > 0
        recorder = _SampledLogprobs(params.temperature, params.top_p)
        # Only the global defaults and the flags below apply: the model's own generation_config (a
        # checkpoint's temperature, top_k, repetition_penalty, ...) is set aside for the call, so it
        # cannot change the distribution nor trigger transformers' warnings about unused flags.
        flags = (
            {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
            if sample
            else {"do_sample": False}
        )
        config = GenerationConfig(
            **flags,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
            num_beams=1,
            num_return_sequences=1,
        )
        own_config = model.generation_config
        model.generation_config = GenerationConfig()
        try:
            with _seeded(seed, device), torch.no_grad():
                seq_BL = model.generate(
                    input_ids=ids_BP.to(device),
                    attention_mask=mask_BP.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([recorder]),
                    # transformers turns this on for FSDP-managed models, adding one collective per
                    # decoding step; the trainer unshards everything around generation instead
                    # (resrl.distributed.full_parameters), so ranks decode independently.
                    synced_gpus=False,
                )
        finally:
            model.generation_config = own_config
        new_BG = seq_BL[:, width:]
        logp_BG = recorder.finish(seq_BL, new_BG.shape[1]).cpu()
        new_BG = new_BG.cpu()
        samples = []
        for b, prompt in enumerate(prompts):
            tokens = new_BG[b].tolist()
            end = first_stop(tokens, self.stop_ids)
            truncated = end == 0
            end = end or len(tokens)
            logprobs = logp_BG[b, :end]
            if not torch.isfinite(logprobs).all():
                raise RuntimeError(
                    "a sampled token has a non-finite log-prob: the recorded distribution is not the one "
                    "generate sampled from (a processor after ours?) or the model produced NaN logits"
                )
            response = tokens[:end]
            text_ids = response if truncated else response[:-1]
            samples.append(
                Sample(
                    prompt_ids=list(prompt),
                    response_ids=response,
                    logprobs=logprobs.tolist(),
                    truncated=truncated,
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                )
            )
        return samples
