"""Where the suite runs the Triton cases (tests/conftest.py), seen from a fresh pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_triton_interpret_0_skips_the_triton_cases_without_cuda():
    """An explicit TRITON_INTERPRET=0: without CUDA the Triton cases skip with the reason and nothing
    fails; with CUDA the same cases run compiled on CUDA tensors and pass."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RESRL_KERNEL_IMPL", None)
    cases = "test_zero_tokens or test_entropy_only_gradient"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "tests/test_linear_logprob.py", "-k", cases]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if torch.cuda.is_available():
        assert "4 passed" in out and "skipped" not in out, out[-3000:]
    else:
        assert "2 passed, 2 skipped" in out, out[-3000:]
        assert out.count("Triton needs CUDA or TRITON_INTERPRET=1") == 2, out[-3000:]
