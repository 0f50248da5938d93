"""Step metrics: one JSON object per line in metrics.jsonl, the same scalars to TensorBoard; peak
GPU memory per phase; the one-line warnings of a run."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def warn(message: str) -> None:
    """A warning for the person running the command: one line on stderr."""
    print(f"resrl: warning: {message}", file=sys.stderr, flush=True)


# Loggers that write to stderr when transformers imports an installed torchao (its quantizer
# registry does, for every model): "Failed to load ..." for each CUDA extension a CPU-only or
# other-Python build lacks, and torch's deprecation notice for torchao's enums. Several lines
# that are no one's mistake, before a run's own output or its one-line error.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Keep IMPORT_NOISE's warnings off stderr for the rest of the process (errors still show);
    called before transformers' models are first imported."""
    for name in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)


class Tracker:
    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Rows written after the checkpoint we resume from belong to steps about to be redone.
            kept = [json.dumps(row) for row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return _read_rows(Path(run_dir) / "metrics.jsonl")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file. A line that is not a JSON object (the torn last line of a
    process killed while writing it) is dropped with a warning naming it."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            what = "its torn last line" if number == len(lines) else f"line {number}, not a JSON object"
            warn(f"{path}: dropped {what}: {line[:60]!r}")
            continue
        rows.append(row)
    return rows


class PeakMemory:
    """Peak accelerator memory per phase: `peak(name)` ends a phase (memory/{name}_peak_gib:
    the most this process's tensors held during it) and starts the next. Nothing on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.values: dict[str, float] = {}
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def __call__(self, phase: str) -> None:
        if self.device is None:
            return
        self.values[f"memory/{phase}_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)


class PhaseClock:
    """Wall time and peak accelerator memory of each phase of one step: `start(name)` ends the
    running phase and starts `name` (and tells `show`, e.g. the progress bar); `stop(tokens)` ends
    the last one and returns time/<phase>_s, throughput/<phase>_tokens_per_s (the step's tokens
    over the phase's seconds; not for sync), memory/<phase>_peak_gib on CUDA and time/step_s."""

    def __init__(self, device: torch.device, show=None) -> None:
        self.peak = PeakMemory(device)
        self.show = show
        self.times: dict[str, float] = {}
        self.name: str | None = None
        self.t0 = self.mark = time.perf_counter()

    def _end(self) -> None:
        now = time.perf_counter()
        if self.name is not None:
            self.times[self.name] = now - self.mark
            self.peak(self.name)
        self.name, self.mark = None, now

    def start(self, name: str) -> None:
        self._end()
        self.name = name
        if self.show is not None:
            self.show(name)

    def stop(self, tokens: float) -> dict[str, float]:
        self._end()
        out = dict(self.peak.values)
        for name, seconds in self.times.items():
            out[f"time/{name}_s"] = seconds
            if name != "sync" and seconds > 0:
                out[f"throughput/{name}_tokens_per_s"] = tokens / seconds
        out["time/step_s"] = self.mark - self.t0
        return out
