"""Non-finite guards of the RL loop: a phase whose numbers stopped being finite ends the run in one
line naming the step and the phase, before anything is saved (no checkpoint holds NaN weights)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from resrl.config import RunError
from resrl.distributed import World, all_gather_objects

HINT = "lower optim.lr or check the data (no checkpoint was written after it)"


@contextlib.contextmanager
def stop_if_not_finite(phase: str, step: int) -> Iterator[None]:
    """One line naming the step and phase, instead of a traceback, when the numbers of a phase
    stopped being finite: the gradient-norm check of `optimizer_step` (FloatingPointError,
    "step N: ...") or the kernels' value checks (ValueError "... contains NaN or Inf")."""
    try:
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
