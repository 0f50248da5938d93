"""Every Triton kernel of `kernels/` compiles for Hopper (sm_90) with no GPU: `python -m kernels._aot`.

The check needs Triton's real compiler, so it runs in a subprocess without TRITON_INTERPRET (which
conftest sets for the rest of the suite). It compiles the tile configs the code picks on CUDA for
bf16, fp16 and fp32 inputs and fails on a compile error, a launch over Hopper's shared-memory or
register limits, any spill, or a 16-bit dot not lowered to wgmma.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._aot import Variant, _judge

ROOT = Path(__file__).resolve().parent.parent


def bundled_tools_present() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / tool).exists() for tool in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not bundled_tools_present(), reason="this triton build bundles no ptxas/cuobjdump")
def test_every_kernel_compiles_for_sm90_within_limits_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "kernels._aot", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Every kernel appears in the report with its registers read from the cubin.
    for kernel in ("_logprob_fwd_kernel", "_dlogits_kernel", "_residual_kernel", "_weights_kernel"):
        assert f"| {kernel} |" in out, out[-3000:]


def variant(**kw) -> Variant:
    base = dict(kernel="k", workloads=["w"], constexprs="", num_warps=8, num_stages=3, smem=1024, regs=128)
    return Variant(**{**base, **kw})


# name: (variant fields, expected problem fragment or None)
JUDGED = {
    "clean": (dict(sass={"HGMMA": 4}, dot16=True), None),
    "shared_memory_over_227KiB": (dict(smem=232449), "shared memory"),
    "registers_over_file": (dict(regs=255, num_warps=16), "register file"),
    "spill_stack": (dict(stack=8, sass={"STL": 2, "LDL": 2}), "spills"),
    "local_memory": (dict(local=16), "spills"),
    "bf16_dot_on_mma_sync": (dict(dot16=True, sass={"HMMA": 8}), "wgmma"),
}


@pytest.mark.parametrize("case", list(JUDGED), ids=list(JUDGED))
def test_judge_flags_each_limit(case):
    fields, fragment = JUDGED[case]
    v = variant(**fields)
    _judge(v, 90)
    if fragment is None:
        assert v.problems == []
    else:
        assert len(v.problems) == 1 and fragment in v.problems[0], v.problems
