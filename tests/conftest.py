"""Test setup: the Triton interpreter on machines without CUDA, fixed seeds.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is done here, at the
top of the first module pytest loads. Tests choose the implementation per case with
`monkeypatch.setenv("RESRL_KERNEL_IMPL", ...)`.
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    try:
        import ctypes.util

        has_cuda = ctypes.util.find_library("cuda") is not None
    except Exception:
        has_cuda = False
    if not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
