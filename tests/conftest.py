"""Test setup: where the Triton cases run, the `gpu` marker, fixed seeds.

Kernel tests take the `impl` fixture ("torch" or "triton", set through RESRL_KERNEL_IMPL) and the
`device` fixture, the device their tensors go to:

| machine and environment                   | Triton cases                | torch cases | gpu-marked |
|-------------------------------------------|-----------------------------|-------------|------------|
| CUDA, TRITON_INTERPRET unset (or not 1)   | CUDA tensors, compiled      | CPU         | run        |
| no CUDA, TRITON_INTERPRET unset           | CPU tensors, interpreter: this file sets TRITON_INTERPRET=1 | CPU | skipped |
| TRITON_INTERPRET=1 (any machine)          | CPU tensors, interpreter    | CPU         | skipped    |
| no CUDA, TRITON_INTERPRET=0 (or not 1)    | skipped, with the reason    | CPU         | skipped    |

`@triton.jit` reads TRITON_INTERPRET when `kernels` is imported, so the choice is made here, at the
top of the first module pytest loads, before any test module imports the kernels. The trainer
tests pin `run.device=cpu` (tests/small.py): their tolerances are fp32 CPU numerics.
"""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if "TRITON_INTERPRET" not in os.environ and not HAS_CUDA:
    early = [name for name in ("triton", "kernels") if name in sys.modules]
    if early:
        raise RuntimeError(
            f"{' and '.join(early)} imported before tests/conftest.py could set TRITON_INTERPRET=1 (a pytest "
            "plugin or a conftest above tests/?); set TRITON_INTERPRET=1 in the environment instead"
        )
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Where a Triton case's tensors go; None: Triton cannot run here.
if INTERPRET:
    TRITON_DEVICE: torch.device | None = torch.device("cpu")
elif HAS_CUDA:
    TRITON_DEVICE = torch.device("cuda")
else:
    TRITON_DEVICE = None
NO_TRITON = "Triton needs CUDA or TRITON_INTERPRET=1"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch) -> str:
    """The kernel implementation of this case, set through RESRL_KERNEL_IMPL."""
    if request.param == "triton" and TRITON_DEVICE is None:
        pytest.skip(NO_TRITON)
    monkeypatch.setenv("RESRL_KERNEL_IMPL", request.param)
    return request.param


@pytest.fixture
def device(impl) -> torch.device:
    """The device of this case's tensors: the Triton path's (CUDA, or CPU under the interpreter),
    or the CPU for the PyTorch path (its tolerances are fp32 CPU numerics)."""
    return TRITON_DEVICE if impl == "triton" else torch.device("cpu")


@pytest.fixture
def triton_on_cpu() -> None:
    """Skips a test that runs the Triton path on CPU tensors (the trainer pinned to the CPU) where
    the interpreter is off, as on a CUDA machine."""
    if not INTERPRET:
        pytest.skip("runs Triton on CPU tensors, which needs TRITON_INTERPRET=1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA and not INTERPRET:
        return
    reason = "needs a CUDA GPU" if not HAS_CUDA else "TRITON_INTERPRET=1: the gpu cases need compiled Triton"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
