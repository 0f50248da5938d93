"""What a run is built from: device, tokenizer, prompt sets, model, and the prompt sampler."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resrl.config import Config, ConfigError
from resrl.data import Example, encode_prompt, load_examples
from resrl.errors import ModelFolderError
from resrl.tasks import arithmetic
from resrl.tracker import quiet_import_noise, warn


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
        warn(
            f"{len(examples) - len(kept)} of {len(examples)} {what} prompts are longer than "
            f"data.max_prompt_length={max_len} tokens and were dropped"
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


def load_pretrained(loader, path: str, *, what: str, part: str, progress: bool = True, **kwargs):
    """`loader.from_pretrained(path, **kwargs)` with a corrupt or unreachable folder as one line.

    When `part` names weights, weights that do not fit config.json (missing, unexpected, another
    shape: transformers would start those parameters at random) are one line too
    (`check_weights_match`), and transformers' own load report stays off stderr; without
    `progress`, so does its loading bar."""
    quiet_import_noise()
    if "weights" not in part:
        return _from_pretrained(loader, path, what, part, kwargs)
    # Mismatched shapes are loaded (left at random) only to be reported by the check.
    kwargs = {**kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
    with _quiet_transformers(progress=progress):
        model, info = _from_pretrained(loader, path, what, part, kwargs)
    check_weights_match(model, info, path, what=what)
    return model


def _from_pretrained(loader, path: str, what: str, part: str, kwargs: dict):
    from safetensors import SafetensorError

    try:
        # A config.json that fails transformers' own validation (e.g. num_hidden_layers against
        # layer_types) raises huggingface_hub's StrictDataclassError, not a ValueError.
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: transformers raises ValueError

        class StrictDataclassError(Exception):  # noqa: N818
            pass

    try:
        return loader.from_pretrained(path, **kwargs)
    except StrictDataclassError as e:
        reason = " ".join(str(e).split())[:300]
        raise ModelFolderError(f"{what} {path}: config.json is not a valid model config ({reason})") from e
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelFolderError(f"{what} {path}: cannot load the {part} ({reason})") from e


def load_tokenizer(path: str, *, what: str, hub: bool = True):
    """The tokenizer of a model folder (or hub id), or one line saying what is wrong with it."""
    from transformers import AutoTokenizer

    check_model_folder(path, what=what, parts=("tokenizer",), hub=hub)
    tokenizer = load_pretrained(AutoTokenizer, path, what=what, part="tokenizer")
    if tokenizer.eos_token_id is None:
        pad = "" if tokenizer.pad_token_id is not None else " and no pad token to pad batches with"
        raise ModelFolderError(
            f"{what} {path}: the tokenizer has no EOS token{pad}, so a response could never end; "
            "set eos_token (e.g. the chat template's end-of-turn token) in its tokenizer_config.json, "
            "or use a tokenizer that has one"
        )
    return tokenizer


def _tokenizer(cfg: Config) -> tuple[object, str]:
    """The run's tokenizer and where it comes from, as error messages name it."""
    if cfg.data.tokenizer is not None:
        what = "config data.tokenizer"
        return load_tokenizer(cfg.data.tokenizer, what=what), f"{what} {cfg.data.tokenizer}"
    if cfg.model.path is not None:
        what = "config model.path"
        return load_tokenizer(cfg.model.path, what=what), f"{what} {cfg.model.path}"
    return arithmetic.build_char_tokenizer(), "the embedded task's character tokenizer"


def _load_files(paths: list[str], tokenizer, source: str) -> list[Example]:
    """The examples of `paths`, in order; chat-message prompts need the tokenizer's chat template."""
    examples = []
    for path in paths:
        loaded = load_examples(path)
        if not getattr(tokenizer, "chat_template", None) and any(
            not isinstance(ex.prompt, str) for ex in loaded
        ):
            raise ConfigError(
                f"{path}: its prompts are chat messages (lists of role/content), but the tokenizer of "
                f"{source} has no chat template to render them; pass data.tokenizer=<a folder whose "
                "tokenizer has one> or write the prompts as strings"
            )
        examples += loaded
    return examples


def load_task(cfg: Config) -> tuple[object, PromptSet, PromptSet]:
    """(tokenizer, training prompts, held-out prompts), from files or the embedded task; checked
    against the model before any model is built (`check_fits_model`)."""
    d = cfg.data
    tokenizer, source = _tokenizer(cfg)
    if d.train_files:
        train = _load_files(d.train_files, tokenizer, source)
    else:
        knobs = {"min_ops": d.task_min_ops, "max_ops": d.task_max_ops, "max_operand": d.task_max_operand}
        train_p, eval_p = arithmetic.generate_splits(
            d.task_train_size, d.task_eval_size, d.task_seed, **knobs
        )
        train = _task_examples(train_p)
        if not d.eval_files:
            held_out = _task_examples(eval_p)
    if d.eval_files:
        held_out = _load_files(d.eval_files, tokenizer, source)
    elif d.train_files:
        raise ConfigError(
            "config data.eval_files: needed with data.train_files (a held-out set to evaluate on)"
        )
    max_len = d.max_prompt_length
    train_set = _encode(train, tokenizer, max_len, "training")
    held_out_set = _encode(held_out, tokenizer, max_len, "held-out")
    check_fits_model(cfg, tokenizer, source, train_set, held_out_set)
    return tokenizer, train_set, held_out_set


def check_vocabulary(tokenizer, rows: int | None, *, source: str, where: str) -> None:
    """Fail in one line when the tokenizer has more tokens than the model's embedding has `rows`
    (None or 0: unknown, nothing to check). `source` names the tokenizer, `where` the rows."""
    if rows and len(tokenizer) > rows:
        raise ModelFolderError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens, more than the model's {rows} "
            f"embedding rows ({where}); its ids past {rows - 1} have no embedding; use the model's "
            "own tokenizer or a model with a larger vocabulary"
        )


def _model_config(cfg: Config) -> tuple[dict, str]:
    """What the policy's shape will be, read before it is built: (config dict, where it is set)."""
    m = cfg.model
    if m.path is None:
        built = {"vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings}
        return built, "model.{field}"
    what = "config model.path"
    if check_model_folder(m.path, what=what, parts=("config", "weights")):
        config = json.loads((Path(m.path) / "config.json").read_text(encoding="utf-8"))
    else:
        from transformers import AutoConfig

        config = load_pretrained(AutoConfig, m.path, what=what, part="config").to_dict()
    # Multimodal configs nest the language model's fields.
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**text, **config}
    return config, f"{{field}} in {m.path}/config.json"


def check_fits_model(cfg: Config, tokenizer, source: str, train: PromptSet, held_out: PromptSet) -> None:
    """Fail in one line, before any model is built, when the model cannot take this task: a
    tokenizer with more tokens than the model's embedding has rows, or prompts plus
    rollout.max_new_tokens longer than its positions (max_position_embeddings). The training
    prompts and the held-out prompts that evaluation samples (eval.max_problems) are measured;
    the vllm engine is sized for data.max_prompt_length + rollout.max_new_tokens."""
    config, where = _model_config(cfg)
    # A built model's model.vocab_size is checked where it is built (`load_model`).
    if cfg.model.path is not None:
        rows = config.get("vocab_size")
        check_vocabulary(tokenizer, rows, source=source, where=where.format(field="vocab_size"))
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return
    new = cfg.rollout.max_new_tokens
    evaluated = held_out.prompt_ids[: cfg.eval.max_problems or None]
    longest_train = max(map(len, train.prompt_ids))
    longest_eval = max(map(len, evaluated))
    longest = max(longest_train, longest_eval)
    has = f"the model has {positions} positions ({where.format(field='max_position_embeddings')})"
    if cfg.rollout.engine == "vllm" and cfg.data.max_prompt_length + new > positions:
        raise ConfigError(
            f"config data.max_prompt_length={cfg.data.max_prompt_length} + rollout.max_new_tokens={new} "
            f"= {cfg.data.max_prompt_length + new} positions, the vllm engine's length, but {has}; lower "
            "data.max_prompt_length or rollout.max_new_tokens, or use a model with more positions"
        )
    if longest + new > positions:
        room = positions - longest
        lower = f"lower rollout.max_new_tokens to at most {room}, or " if room >= 1 else ""
        raise ConfigError(
            f"config rollout.max_new_tokens={new}: the longest prompt has {longest} tokens (training "
            f"{longest_train}, held-out {longest_eval}), so prompt + response needs {longest + new} "
            f"positions, but {has}; {lower}drop long prompts with data.max_prompt_length (now "
            f"{cfg.data.max_prompt_length}), or use a model with more positions"
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
    quiet_import_noise()
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
            progress=cfg.run.progress,
            dtype=dtype,
            attn_implementation=attn,
        )
    model.to(device=device, dtype=dtype)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextmanager
def _quiet_transformers(*, progress: bool):
    """transformers' load report (its table of missing and mismatched weights: `check_weights_match`
    says it in one line) and, without `progress`, its loading bar, kept off stderr."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


_LAYER_RE = re.compile(r"\blayers\.(\d+)\.")


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_weights_match(model: nn.Module, info: dict, path: str, *, what: str) -> None:
    """Fail in one line when the weights of a model folder do not fit its config.json: parameters
    the weights lack (transformers would initialize them at random), weights the model has no place
    for, or shapes that differ. `info` is `from_pretrained(..., output_loading_info=True)`'s."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if not (missing or unexpected or mismatched):
        return
    found = []
    configured = getattr(model.config, "num_hidden_layers", None)
    if configured is not None and (missing or unexpected):
        # The layers the weights hold: the model's own keys they have, and those it has no place for.
        stored = (set(model.state_dict()) - set(missing)) | set(unexpected)
        held = {int(m.group(1)) for key in stored if (m := _LAYER_RE.search(key))}
        if held and len(held) != configured:
            found.append(
                f"config.json has num_hidden_layers={configured}, the weights hold {len(held)} layers"
            )
    if missing:
        found.append(
            f"{len(missing)} parameters are missing from the weights and would start at random "
            f"({_names(missing)})"
        )
    if unexpected:
        found.append(
            f"{len(unexpected)} weights have no place in the model and would be dropped ({_names(unexpected)})"
        )
    if mismatched:
        shapes = [
            f"{key}: {list(saved)} stored, {list(wanted)} configured" for key, saved, wanted in mismatched
        ]
        found.append(f"{len(mismatched)} shapes differ and would start at random ({_names(shapes, 2)})")
    raise ModelFolderError(
        f"{what} {path}: config.json does not match the weights: {'; '.join(found)}; pass a folder "
        "whose config.json belongs to its weights (e.g. a run's final/ folder)"
    )


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
