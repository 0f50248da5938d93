"""What a run is built from: device, tokenizer, prompt sets, model, and the prompt sampler."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resrl.config import Config, ConfigError
from resrl.data import Example, encode_prompt, load_examples
from resrl.errors import ModelFolderError
from resrl.tasks import arithmetic


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """run.device as a torch.device; "auto" and "cuda" mean this process's GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config run.device: {name!r} asked for but CUDA is not available; use cpu or auto")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


@dataclass
class PromptSet:
    examples: list[Example]
    prompt_ids: list[list[int]]


def _encode(examples: list[Example], tokenizer, max_len: int, what: str) -> PromptSet:
    kept, ids = [], []
    for ex in examples:
        p = encode_prompt(ex, tokenizer)
        if len(p) <= max_len:
            kept.append(ex)
            ids.append(p)
    if len(kept) < len(examples):
        warnings.warn(
            f"{len(examples) - len(kept)} of {len(examples)} {what} prompts are longer than "
            f"data.max_prompt_length={max_len} tokens and were dropped",
            stacklevel=2,
        )
    if not kept:
        raise ConfigError(
            f"config data.max_prompt_length: every {what} prompt is longer than {max_len} tokens"
        )
    return PromptSet(kept, ids)


# What each part of a Hugging Face model folder is stored as; one file of a part is enough.
MODEL_FOLDER_PARTS: dict[str, tuple[str, ...]] = {
    "config": ("config.json",),
    "weights": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),
}
# "org/name": what a Hugging Face hub id looks like (a path that does not exist may be one).
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_folder(
    path: str, *, what: str, parts: tuple[str, ...] = ("config", "weights", "tokenizer"), hub: bool = True
) -> bool:
    """Fail with one line when `path` is not a usable model folder; True when it is a local folder.

    `what` names the setting in the message (e.g. "config model.path", "--model"). Each of `parts`
    (keys of MODEL_FOLDER_PARTS) must be present; the message lists every missing one. With `hub`,
    a path that does not exist locally but looks like a hub id (`org/name`) is left to
    transformers (False is returned): it may be in the local cache or downloadable.
    """
    folder = Path(path)
    if folder.is_dir():
        missing = [
            part
            for part in parts
            if not any((folder / name).is_file() for name in MODEL_FOLDER_PARTS[part])
            and not (part == "weights" and any(folder.glob("*.safetensors")))
        ]
        if missing:
            names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
            looked = "; ".join(f"{part}: {' or '.join(MODEL_FOLDER_PARTS[part])}" for part in missing)
            raise ModelFolderError(
                f"{what} {path}: not a complete Hugging Face model folder, missing the {names} "
                f"({looked}); pass a run's final/ folder or a downloaded checkpoint"
            )
        if (folder / "config.json").is_file():
            try:
                json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFolderError(f"{what} {path}: config.json is unreadable ({e})") from e
        return True
    if folder.exists():
        raise ModelFolderError(f"{what} {path}: a file, not a model folder")
    if hub and _HUB_ID_RE.fullmatch(str(path)):
        return False
    raise ModelFolderError(
        f"{what} {path}: no such folder; pass a Hugging Face model folder (a run's final/ folder, a "
        "downloaded checkpoint) or a hub id such as Qwen/Qwen3-4B"
        if hub
        else f"{what} {path}: no such folder; pass a Hugging Face model folder (e.g. runs/tiny/final)"
    )


def load_pretrained(loader, path: str, *, what: str, part: str, **kwargs):
    """`loader.from_pretrained(path, **kwargs)` with a corrupt or unreachable folder as one line."""
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelFolderError(f"{what} {path}: cannot load the {part} ({reason})") from e


def load_tokenizer(path: str, *, what: str, hub: bool = True):
    """The tokenizer of a model folder (or hub id), or one line saying what is wrong with it."""
    from transformers import AutoTokenizer

    check_model_folder(path, what=what, parts=("tokenizer",), hub=hub)
    return load_pretrained(AutoTokenizer, path, what=what, part="tokenizer")


def _tokenizer(cfg: Config):
    if cfg.data.tokenizer is not None:
        return load_tokenizer(cfg.data.tokenizer, what="config data.tokenizer")
    if cfg.model.path is not None:
        return load_tokenizer(cfg.model.path, what="config model.path")
    return arithmetic.build_char_tokenizer()


def load_task(cfg: Config) -> tuple[object, PromptSet, PromptSet]:
    """(tokenizer, training prompts, held-out prompts), from files or the embedded task."""
    d = cfg.data
    tokenizer = _tokenizer(cfg)
    if d.train_files:
        train = [ex for path in d.train_files for ex in load_examples(path)]
    else:
        knobs = {"min_ops": d.task_min_ops, "max_ops": d.task_max_ops, "max_operand": d.task_max_operand}
        train_p, eval_p = arithmetic.generate_splits(
            d.task_train_size, d.task_eval_size, d.task_seed, **knobs
        )
        train = _task_examples(train_p)
        if not d.eval_files:
            held_out = _task_examples(eval_p)
    if d.eval_files:
        held_out = [ex for path in d.eval_files for ex in load_examples(path)]
    elif d.train_files:
        raise ConfigError(
            "config data.eval_files: needed with data.train_files (a held-out set to evaluate on)"
        )
    max_len = d.max_prompt_length
    return (
        tokenizer,
        _encode(train, tokenizer, max_len, "training"),
        _encode(held_out, tokenizer, max_len, "held-out"),
    )


def _task_examples(problems: list[dict]) -> list[Example]:
    return [
        Example(
            prompt=arithmetic.format_prompt(p["problem"]),
            answer=p["answer"],
            data_source=arithmetic.DATA_SOURCE,
            index=i,
            solution=p["solution"],
        )
        for i, p in enumerate(problems)
    ]


def attention_implementation(name: str, device: torch.device) -> str:
    """The transformers attention kernel for config `model.attn_implementation` on `device`."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if name == "flash_attention_2" and not (device.type == "cuda" and has_flash):
        raise ConfigError(
            "config model.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn "
            f"package (`pip install resrl[gpu]`); here: device {device.type}, flash-attn "
            f"{'installed' if has_flash else 'not installed'}; accepted here: auto, sdpa, eager"
        )
    return name


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype forwards run in for config `model.dtype` on `device` (auto: bf16 on CUDA, fp32
    elsewhere). When it is 16-bit, the trainer keeps fp32 master weights (`resrl.trainer`)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(
    cfg: Config,
    tokenizer,
    device: torch.device,
    dtype: torch.dtype | None = None,
    compute_device: torch.device | None = None,
) -> nn.Module:
    """The policy on `device` in `dtype` (default: model.dtype, where auto = bf16 on CUDA).
    `compute_device` (default `device`) is where it will run: it picks the attention kernel, and
    differs from `device` when the weights are built on the CPU for FSDP2 offload."""
    m = cfg.model
    compute_device = compute_device or device
    dtype = dtype or compute_dtype(m.dtype, compute_device)
    attn = attention_implementation(m.attn_implementation, compute_device)
    if m.path is None:
        from resrl.model import build_qwen3

        if m.vocab_size and m.vocab_size < len(tokenizer):
            raise ConfigError(
                f"config model.vocab_size={m.vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                "tokens; use 0 (the tokenizer's size) or a larger value"
            )
        model = build_qwen3(
            m.vocab_size or len(tokenizer),
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings,
            tie_word_embeddings=m.tie_word_embeddings,
            seed=cfg.run.seed,
        )
        if attn != "sdpa":
            model.set_attn_implementation(attn)
    else:
        from transformers import AutoModelForCausalLM

        # The tokenizer may come from data.tokenizer; config and weights must be in model.path.
        check_model_folder(m.path, what="config model.path", parts=("config", "weights"))
        model = load_pretrained(
            AutoModelForCausalLM,
            m.path,
            what="config model.path",
            part="config and weights",
            dtype=dtype,
            attn_implementation=attn,
        )
    model.to(device=device, dtype=dtype)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class PromptSampler:
    """Prompt indices in seeded per-epoch shuffles; its state is the data position of a checkpoint."""

    def __init__(self, n: int, per_step: int, *, seed: int, shuffle: bool) -> None:
        if per_step > n:
            raise ConfigError(f"config train.prompts_per_step={per_step} exceeds the {n} training prompts")
        self.n, self.per_step, self.seed, self.shuffle = n, per_step, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[int]:
        if self.cursor + self.per_step > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        out = self._order[self.cursor : self.cursor + self.per_step]
        self.cursor += self.per_step
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()
