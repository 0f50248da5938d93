"""Guards of the RL loop that end a run in one line instead of a traceback: a phase whose numbers
stopped being finite (named with its step, before anything is saved: no checkpoint holds NaN
weights), a phase that ran out of memory (named with the knobs that lower its memory), and an
output folder that cannot be written (checked before any work)."""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from resrl.config import RunError
from resrl.distributed import World, all_gather_objects
from resrl.errors import InputError

HINT = "lower optim.lr or check the data (no checkpoint was written after it)"


# What lowers the memory of each phase, as the out-of-memory line names it.
MEMORY_KNOBS: dict[str, str] = {
    "model load": "set train.cpu_offload=true (fp32 masters, gradients and AdamW state on the host) "
    "or use a smaller model",
    "warm start": "lower sft.batch_size, or set model.gradient_checkpointing=true or train.cpu_offload=true",
    "rollout": "lower rollout.max_batch_size (hf engine), rollout.gpu_memory_utilization (vllm), "
    "train.prompts_per_step, rollout.n or rollout.max_new_tokens",
    "pre-pass": "lower train.micro_batch_size, or train.max_tokens_per_micro_batch with train.pack=true",
    "update": "lower train.micro_batch_size, or train.max_tokens_per_micro_batch with train.pack=true, "
    "or set model.gradient_checkpointing=true or train.cpu_offload=true",
    "sync": "lower rollout.gpu_memory_utilization (vllm), or set train.cpu_offload=true",
    "evaluation": "lower rollout.max_batch_size (hf engine), rollout.gpu_memory_utilization (vllm), "
    "eval.n or rollout.max_new_tokens",
}


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, Python's MemoryError, or torch's CPU allocator failing (a
    RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _memory_reason(error: BaseException) -> str:
    """How much was asked for, from torch's message (the rest of it describes the allocator's
    state over several lines)."""
    text = " ".join(str(error).split())
    found = re.search(r"[Tt]ried to allocate (\d+(?:\.\d+)? ?[KMGT]i?B)", text)
    if found:
        return f"tried to allocate {found.group(1)}"
    found = re.search(r"tried to allocate (\d+) bytes", text)
    if found:
        return f"tried to allocate {int(found.group(1)) / 2**30:.2f} GiB"
    return text[:160] or type(error).__name__


@contextlib.contextmanager
def out_of_memory_as_one_line(
    phase: str, step: int | None = None, knobs: str | None = None
) -> Iterator[None]:
    """One line naming the phase, the step and the knobs that lower the phase's memory (`knobs`,
    default MEMORY_KNOBS[phase]), instead of a traceback, when the phase runs out of accelerator
    memory (torch.OutOfMemoryError) or host memory (MemoryError, torch's CPU allocator)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        where = f"the {phase} phase" + ("" if step is None else f" at step {step}")
        device = "accelerator memory" if isinstance(e, torch.OutOfMemoryError) else "host memory"
        knobs = knobs or MEMORY_KNOBS.get(phase, "lower the batch sizes")
        raise RunError(f"out of {device} in {where} ({_memory_reason(e)}); {knobs}") from e


@contextlib.contextmanager
def stop_if_not_finite(phase: str, step: int) -> Iterator[None]:
    """One line naming the step and phase, instead of a traceback, when the numbers of a phase
    stopped being finite: the gradient-norm check of `optimizer_step` (FloatingPointError,
    "step N: ...") or the kernels' value checks (ValueError "... contains NaN or Inf"); and when it
    runs out of memory (`out_of_memory_as_one_line`)."""
    try:
        with out_of_memory_as_one_line(phase, step):
            yield
    except FloatingPointError as e:
        raise RunError(f"training stopped in the {phase} phase at {e}") from e
    except ValueError as e:
        if "NaN or Inf" not in str(e):
            raise
        raise RunError(f"training stopped in the {phase} phase at step {step}: {e}; {HINT}") from e


def check_finite(step: int, metrics: dict[str, float], module: nn.Module, world: World) -> None:
    """Stop before anything is saved when the update made the loss or the weights of `module`
    non-finite (the gradient norm is checked before the optimizer step, in `optimizer_step`)."""
    bad = [k for k, v in metrics.items() if k.startswith(("loss/", "head/")) and not math.isfinite(v)]
    if bad:
        raise RunError(
            f"training stopped in the update phase at step {step}: {bad[0]} is {metrics[bad[0]]}; {HINT}"
        )
    # This rank's shards, one host sync for all of them.
    local = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in module.named_parameters()]
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for _, p in local]).tolist()
    first = next((n for (n, _), ok in zip(local, finite, strict=True) if not ok), None)
    first = all_gather_objects(first, world)
    first = next((n for n in first if n is not None), None)
    if first is not None:
        raise RunError(
            f"training stopped in the update phase at step {step}: the parameters are not finite "
            f"after the optimizer step (first: {first}); lower optim.lr (no checkpoint was "
            "written after it)"
        )


def check_writable(folder: str | Path, *, what: str) -> Path:
    """Create `folder` (and its parents) and write and remove a file in it, before any work, so
    that an output folder that cannot be written (no permission, a read-only file system, a file
    in the way) is one line naming `what` (e.g. "--out", "config run.out_dir") at the start, not a
    traceback after the work. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".resrl-write-check-"):
            pass
    except OSError as e:
        raise InputError(
            f"{what} {folder}: cannot write there ({e.strerror or e}); pass a writable folder"
        ) from None
    return folder
