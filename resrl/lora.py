"""LoRA: the policy trains low-rank adapters on a frozen base (`model.lora_rank > 0`).

One module that the loader, the update, the engines and the checkpoints ask:
- `apply(model, cfg)`: peft's LoRA layers injected in place into every targeted linear layer of the
  decoder blocks (the LM head and embeddings stay frozen); the base is frozen in the compute dtype,
  the adapters (A random, B zero: the adapted model starts as the base) are fp32 master weights,
  the only parameters with gradients and optimizer state.
- `hf_tensors(named)`: (Hugging Face name, merged weight) from an adapted model's named tensors,
  W + (alpha / r) B A per adapted layer, streamed one layer at a time: the vLLM engine's weight
  sync and the merged export `final/` use it.
- `adapter_state(named)` / `save_adapter(...)`: the adapter alone, as a PEFT folder
  (`adapter_config.json` naming its base folder, `adapter_model.safetensors`), so that
  `PeftModel.from_pretrained(base, folder)` loads it.
Checkpoints of a LoRA run hold only the trainable parameters (the adapter), its optimizer and the
run state; the base is written once per run (`resrl.trainer`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from resrl.config import Config, ConfigError

ADAPTER = "default"
# Parameter-name pieces peft adds inside an adapted layer.
_BASE = ".base_layer."
_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def enabled(cfg: Config) -> bool:
    return cfg.model.lora_rank > 0


def linear_names(model: nn.Module) -> list[str]:
    """The names of the linear layers inside the decoder blocks (q_proj, ..., down_proj)."""
    names = set()
    for layer in model.model.layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def targets(model: nn.Module, cfg: Config) -> list[str]:
    """config model.lora_targets (default: every linear layer of the decoder blocks), checked
    against the model's layers in one line."""
    available = linear_names(model)
    wanted = list(cfg.model.lora_targets) or available
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ConfigError(
            f"config model.lora_targets: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
            f"linear layer of this model's decoder blocks; accepted: {', '.join(available)}"
        )
    return wanted


def check(cfg: Config, tokenizer) -> None:
    """Before any work (a warm start can take hours): model.lora_targets against the linear layers
    of the model's decoder blocks, on a skeleton without weights (the meta device)."""
    if not enabled(cfg) or not cfg.model.lora_targets:
        return
    m = cfg.model
    with torch.device("meta"):
        if m.path is None:
            from resrl.model import build_qwen3

            model = build_qwen3(
                m.vocab_size or len(tokenizer),
                hidden_size=m.hidden_size,
                num_layers=1,
                num_heads=m.num_heads,
                num_kv_heads=m.num_kv_heads,
                head_dim=m.head_dim,
                intermediate_size=m.intermediate_size,
            )
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            from resrl.loading import load_pretrained

            config = load_pretrained(AutoConfig, m.path, what="config model.path", part="config")
            model = AutoModelForCausalLM.from_config(config)
    targets(model, cfg)


def peft_config(model: nn.Module, cfg: Config):
    from peft import LoraConfig

    m = cfg.model
    names = "|".join(re.escape(t) for t in targets(model, cfg))
    return LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha or 2 * m.lora_rank,
        lora_dropout=m.lora_dropout,
        # The decoder blocks only: never the LM head (the fused kernel reads its weight directly).
        target_modules=rf".*\.layers\.\d+\..*\b({names})",
        bias="none",
    )


def apply(model: nn.Module, cfg: Config, compute_dtype: torch.dtype) -> nn.Module:
    """Freeze `model` in `compute_dtype` and inject LoRA adapters (fp32) in place."""
    from peft import inject_adapter_in_model

    config = peft_config(model, cfg)
    model.requires_grad_(False)
    model.to(compute_dtype)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        trainable = f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
        param.requires_grad_(trainable)
        if trainable:
            # fp32 master weights: AdamW steps of ~lr must not round away.
            param.data = param.data.float()
    model.peft_config = {ADAPTER: config}
    return model


def is_adapted(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def scaling(model: nn.Module) -> float:
    config = model.peft_config[ADAPTER]
    return config.lora_alpha / config.r


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hf_tensors(
    named: Iterable[tuple[str, torch.Tensor]], scale: float, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face names and merged weights, W + scale * B A, from an adapted model's named
    tensors (`named_parameters()`, or a state dict's items, in module order). DTensors are gathered
    one at a time (a collective: every rank must iterate). Plain models pass through unchanged."""
    pending: dict[str, torch.Tensor] = {}
    for name, value in named:
        if name.endswith(_A) or name.endswith(_B):
            stem = name[: -len(_A)]
            pending[stem + ("A" if name.endswith(_A) else "B")] = _full(value)
            if stem + "W" in pending and stem + "A" in pending and stem + "B" in pending:
                w, a, b = pending.pop(stem + "W"), pending.pop(stem + "A"), pending.pop(stem + "B")
                merged = (w.float() + scale * (b.float() @ a.float())).to(dtype or w.dtype)
                yield stem + ".weight", merged
            continue
        if name.endswith(_BASE + "weight"):
            pending[name[: -len(_BASE + "weight")] + "W"] = _full(value)
            continue
        tensor = _full(value)
        yield name.replace(_BASE, "."), tensor if dtype is None else tensor.to(dtype)
    if pending:
        raise RuntimeError(f"LoRA layers without all of base, A and B: {sorted(pending)[:3]}")


def adapter_state(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names (base_model.model.<module>.lora_A.weight)."""
    out = {}
    for name, value in named:
        if name.endswith(_A) or name.endswith(_B):
            key = name.replace(f".{ADAPTER}.weight", ".weight")
            out[f"base_model.model.{key}"] = _full(value).float().cpu().contiguous()
    return out


def save_adapter(
    path: str | os.PathLike, model: nn.Module, state: dict[str, torch.Tensor], base: str
) -> None:
    """A PEFT adapter folder at `path` (written to a temporary folder, then renamed): config naming
    `base` (the base model folder) and the adapter's weights (`adapter_state`)."""
    from safetensors.torch import save_file

    from resrl.checkpoint import folder_written_whole

    config = model.peft_config[ADAPTER].to_dict()
    config["base_model_name_or_path"] = str(Path(base).resolve())
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    with folder_written_whole(path) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})


def local_folder(base: str) -> str:
    """`base` as a local folder: itself, or a Hugging Face Hub id's cached snapshot (what vLLM
    serving the adapter and the adapter's config name)."""
    if Path(base).is_dir():
        return str(base)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise ConfigError(
            f"config model.path {base!r}: not a local folder nor a downloaded Hugging Face Hub model "
            f"({type(e).__name__}); rollout.lora_serving=adapter serves the base from a local folder"
        ) from None


def on_base(cfg: Config, base: str) -> Config:
    """`cfg` with model.path = `base` (what the LoRA policy and its reference are loaded from)."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.path = str(base)
    return out


# In a run directory: the frozen base of a LoRA run, and the metrics of the warm start that made it.
BASE = "base"
WARM_METRICS = "resrl_warm_start.json"


def base_folder(cfg: Config, run_dir: Path) -> tuple[str, dict]:
    """The frozen base of a LoRA run and the warm start's metrics: model.path as given when there
    is no warm start; otherwise `<run>/base/`, written once: a full fine-tuning warm start (its own
    run in `<run>/warm_start/`, checkpointed and resumable like any) of the configured model, or
    the model built from the config, exported in the compute dtype."""
    if cfg.sft.steps == 0 and cfg.model.path is not None:
        return cfg.model.path, {}
    base = Path(run_dir) / BASE
    if not (base / WARM_METRICS).is_file():
        _write_base(cfg, Path(run_dir), base)
    return str(base), json.loads((base / WARM_METRICS).read_text())


def _write_base(cfg: Config, run_dir: Path, base: Path) -> None:
    import copy
    import gc

    from resrl.rollout import free_cached_memory
    from resrl.trainer import Trainer

    warm_cfg = copy.deepcopy(cfg)
    m = warm_cfg.model
    m.lora_rank, m.lora_alpha, m.lora_targets, m.lora_dropout = 0, None, [], 0.0
    warm_cfg.run.out_dir, warm_cfg.run.name = str(run_dir), "warm_start"
    warm_cfg.rollout.engine = "hf"
    warm_cfg.r2po.enabled = False
    warm = Trainer(warm_cfg)
    metrics = warm.warm_start()
    warm.export(base)
    if warm.world.is_main:
        # Written last: a base folder without it is incomplete and is written again.
        (base / WARM_METRICS).write_text(json.dumps(metrics) + "\n")
    warm.close()
    device = warm.device
    del warm
    gc.collect()
    free_cached_memory(device)


def export_adapter(path: Path, policy: nn.Module, base: str, world) -> None:
    """`final_adapter/`: the policy's adapter as a PEFT folder naming `base` (every rank calls
    this: the adapter's shards are gathered; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from resrl.checkpoint import barrier

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    named = (
        (k.removeprefix("model."), v)
        for k, v in get_model_state_dict(policy, options=options).items()
        if k.startswith("model.")
    )
    state = adapter_state(named)
    if world.is_main:
        save_adapter(path, policy.model, state, base)
    barrier(world)
