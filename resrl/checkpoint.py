"""Checkpoints that survive a crash during the save, and resume.

Layout under the run directory::

    checkpoints/step_000020/shards/      model + optimizer, torch.distributed.checkpoint format
    checkpoints/step_000020/meta.pt      step, schedule, data position, RNG, history, config
    checkpoints/latest                   the name of the newest complete one

A save writes into a hidden temporary folder, flushes it, renames it into place and only then moves
the `latest` pointer (write-then-rename, atomic on POSIX). A crash at any point leaves the previous
checkpoint and pointer as they were; the next save removes the leftover. The shards are written
per rank and resharded on load, so a run saved at N processes resumes at M.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from resrl.distributed import SINGLE, World

META_FILE = "meta.pt"
SHARDS = "shards"
POINTER = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: str | os.PathLike,
    step: int,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int = 2,
    world: World = SINGLE,
    frozen: dict[str, nn.Module] | None = None,
) -> Path:
    """Checkpoint `step`: model and optimizer through torch.distributed.checkpoint (each rank writes
    its shards; loadable at another process count), `meta` (schedule, data position, RNG, history)
    from rank 0. `frozen` modules (the KL reference) are saved beside the model under their names.
    Point `latest` at it and keep the newest `keep`. Called by every rank."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".{name}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a save that crashed (this step's or an earlier one's).
        for leftover in root.glob(".step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    _barrier(world)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for key, frozen_module in (frozen or {}).items():
        state[key] = get_model_state_dict(frozen_module)
    dcp.save(state, checkpoint_id=str(tmp / SHARDS))
    if world.is_main:
        with open(tmp / META_FILE, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
    _barrier(world)
    final = root / name
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{POINTER}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / POINTER)
        _fsync_dir(root)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())
    return complete[-1] if complete else None


def load(
    path: str | os.PathLike,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    frozen: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and the named `frozen` modules (resharded to this run's
    processes) in place; return the meta."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / META_FILE})")
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for key, frozen_module in (frozen or {}).items():
        state[key] = get_model_state_dict(frozen_module)
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for key, frozen_module in (frozen or {}).items():
        set_model_state_dict(frozen_module, state[key])
    return load_meta(path)


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's meta (step, schedule, data position, RNG, history, config); our own file."""
    return torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=False)


def _barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def export_hf(
    path: str | os.PathLike, policy: nn.Module, tokenizer: Any, *, sharded: bool, world: World
) -> None:
    """A Hugging Face folder (safetensors, config, tokenizer) that transformers and vLLM load, from
    `policy` (a `Policy` root around the causal LM). Under FSDP2 the full weights are gathered to
    rank 0 first (every rank calls this); rank 0 writes; all ranks return once it is written."""
    model = policy.model
    if sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            k.removeprefix("model."): v for k, v in get_model_state_dict(policy, options=options).items()
        }
        if getattr(model.config, "tie_word_embeddings", False):
            # Tied: the LM head is the embedding; save_pretrained stores it once.
            state.pop("lm_head.weight", None)
        if world.is_main:
            model.save_pretrained(path, state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
    if world.is_main:
        tokenizer.save_pretrained(path)
    # Other ranks may read the folder next (each rank's vLLM engine starts from it).
    _barrier(world)
