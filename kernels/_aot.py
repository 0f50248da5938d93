"""Compile every Triton kernel of `kernels/` for an NVIDIA GPU with no GPU present, and judge the binaries.

    python -m kernels._aot [--arch 90] [--ranks 1,8,20,32,64,128,256] [--dump DIR]

Run it without TRITON_INTERPRET (it refuses otherwise: `triton.jit` then builds interpreter
functions instead of compilable ones). `tests/test_sm90_compile.py` runs it in CI.

How: a stand-in driver tells Triton the current target is `GPUTarget("cuda", arch, 32)`; every
`@triton.jit` function in the package gets a `run` that compiles (Triton's own
`run(warmup=True)` path: the same argument specialization, constexprs and launch options a real
launch gets) instead of launching; then the host launch functions are called on "meta" tensors
(shapes only, 16-byte aligned like CUDA allocations) for bf16, fp16 and fp32 inputs at a Qwen3
shape, so the tile configs are exactly those the code picks on CUDA. Each compiled variant is read
back from its cubin with the cuobjdump that Triton bundles: registers and local memory
(`--dump-resource-usage`, the numbers ptxas -v reports) and the SASS.

A variant fails when it does not compile; when its dynamic shared memory exceeds the per-block
limit or registers x threads exceed the register file (it could not launch); when it spills
(local memory: STL/LDL in the SASS); or when a dot with 16-bit operands is not lowered to wgmma
(HGMMA) on sm_90. A kernel of the package that no workload compiled is a failure too. Exit 0 when
all pass, 1 on a failing variant, 2 when the check itself cannot run.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Per-block dynamic shared memory with opt-in, and the register file, per SM (CUDA programming guide).
LIMITS = {
    80: dict(smem_block=166912, regs_sm=65536),
    89: dict(smem_block=101376, regs_sm=65536),
    90: dict(smem_block=232448, regs_sm=65536),
}
# The README's GPU shape A (N tokens, hidden D, Qwen3 vocabulary V) and groups for the residual.
SHAPE = (16384, 2560, 151936)
GROUPS = 8
DEFAULT_RANKS = (1, 8, 20, 32, 64, 128, 256)


@dataclass
class Variant:
    """One compiled binary and what its cubin says."""

    kernel: str
    workloads: list[str]
    constexprs: str
    num_warps: int
    num_stages: int
    smem: int
    regs: int = 0
    stack: int = 0
    local: int = 0
    sass: dict[str, int] = field(default_factory=dict)
    dot16: bool = False
    problems: list[str] = field(default_factory=list)


class _StandInDriver:
    """Just enough of a Triton driver for compiling: a current device, a stream and a target."""

    def __init__(self, target, smem_block: int) -> None:
        self.target = target

        class _Utils:
            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": smem_block, "multiprocessor_count": 132, "warpSize": 32}

        self.utils = _Utils()

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.target.arch, 10)


def _bundled_tool(name: str) -> str:
    import triton

    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    path = Path(env) if env else Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path} (set TRITON_{name.upper()}_PATH)")
    return str(path)


def _jit_functions() -> dict[str, object]:
    """Every @triton.jit function defined in a module of the kernels package, by qualified name."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{obj.__name__}"] = obj
    return found


class _Compiler:
    """Replaces each kernel's launch by Triton's compile-only path and keeps the binaries."""

    def __init__(self, jit_functions: dict[str, object]) -> None:
        self.workload = ""
        self.compiled: list[tuple[str, str, object]] = []  # (kernel name, workload, CompiledKernel)
        for name, jf in jit_functions.items():
            jf.run = self._compile_instead(name, jf)

    def _compile_instead(self, name: str, jf) -> Callable:
        def run(*args, grid, warmup, **kwargs):
            kernel = type(jf).run(jf, *args, grid=grid, warmup=True, **kwargs)
            if hasattr(kernel, "result"):  # async compile mode returns a future
                kernel = kernel.result()
            self.compiled.append((name, self.workload, kernel))

        return run


def _workloads(ranks: tuple[int, ...]) -> list[tuple[str, Callable[[], None]]]:
    """(label, call) pairs: the host launch functions on meta tensors, per input dtype."""
    import importlib

    import torch

    ll = importlib.import_module("kernels.linear_logprob")
    ss = importlib.import_module("kernels.subspace")

    n, d, v = SHAPE
    meta = torch.device("meta")
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).replace("torch.", "")

        def lm_head(dtype=dtype):
            hidden = torch.empty(n, d, dtype=dtype, device=meta)
            weight = torch.empty(v, d, dtype=dtype, device=meta)
            target = torch.empty(n, dtype=torch.int64, device=meta)
            _, lse, ent = ll.logprob_forward(hidden, weight, target, 0.7)
            grad = torch.empty(n, dtype=torch.float32, device=meta)
            # With and without an entropy term (HAS_ENT), both gradients wanted.
            for grad_entropy in (grad, None):
                ll.logprob_backward(hidden, weight, target, lse, ent, grad, grad_entropy, 0.7, True, True)

        out.append((f"linear_logprob {tag}", lm_head))

        def lm_head_two_part(dtype=dtype):
            # R²PO's rollout head: a second part h2 [N, D2], W2 [V, D2] (D2 = D there), looped into
            # the same logits tile (TWO_PART=True); the backward with all four gradients wanted.
            hidden = torch.empty(n, d, dtype=dtype, device=meta)
            weight = torch.empty(v, d, dtype=dtype, device=meta)
            hidden2 = torch.empty(n, d, dtype=dtype, device=meta)
            weight2 = torch.empty(v, d, dtype=dtype, device=meta)
            target = torch.empty(n, dtype=torch.int64, device=meta)
            _, lse, ent = ll.logprob_forward(hidden, weight, target, 0.7, hidden2, weight2)
            grad = torch.empty(n, dtype=torch.float32, device=meta)
            for grad_entropy in (grad, None):
                ll.logprob_backward(
                    hidden, weight, target, lse, ent, grad, grad_entropy, 0.7, True, True,
                    hidden2, weight2, True, True,
                )  # fmt: skip

        out.append((f"linear_logprob two-part {tag}", lm_head_two_part))
        for k in ranks:

            def residual(dtype=dtype, k=k):
                hidden = torch.empty(n, d, dtype=dtype, device=meta)
                basis = torch.empty(GROUPS, d, k, dtype=torch.float32, device=meta)
                mean = torch.empty(GROUPS, d, dtype=torch.float32, device=meta)
                ss._residual_triton(hidden, basis, mean, torch.arange(n, device=meta) % GROUPS)

            out.append((f"subspace_residual {tag} k={k}", residual))

    def weights():
        f32 = dict(dtype=torch.float32, device=meta)
        segments = torch.empty(n, dtype=torch.int64, device=meta)
        valid = torch.empty(n, dtype=torch.bool, device=meta)
        ss._weights_triton(
            torch.empty(n, **f32), segments, valid, torch.empty(n, **f32), torch.empty(n, **f32), 0.1
        )

    out.append(("residual_weights", weights))
    return out


def _sixteen_bit_dot(ttir: str) -> bool:
    """True when a tt.dot of the kernel takes bf16 or fp16 operands."""
    return any(re.search(r"x(bf16|f16)>", line) for line in ttir.splitlines() if "tt.dot" in line)


def _read_cubin(variant: Variant, cubin: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        cuobjdump = _bundled_tool("cuobjdump")
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True
        )
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", usage.stdout)
        if not m:
            raise RuntimeError(
                f"cuobjdump gave no resource usage for {variant.kernel}:\n{usage.stdout}{usage.stderr}"
            )
        variant.regs, variant.stack, variant.local = (int(x) for x in m.groups())
        if variant.regs == 0:
            raise RuntimeError(f"cuobjdump reports 0 registers for {variant.kernel}: {usage.stdout}")
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True).stdout
    for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)", sass):
        variant.sass[op] = variant.sass.get(op, 0) + 1


def _judge(variant: Variant, arch: int) -> None:
    limits = LIMITS[arch]
    if variant.smem > limits["smem_block"]:
        variant.problems.append(f"shared memory {variant.smem} B > {limits['smem_block']} B per block")
    # Registers are allocated per warp in units of 256.
    regs_block = math.ceil(variant.regs * 32 / 256) * 256 * variant.num_warps
    if regs_block > limits["regs_sm"]:
        variant.problems.append(
            f"{variant.regs} registers x {32 * variant.num_warps} threads > register file"
        )
    spills = variant.sass.get("STL", 0) + variant.sass.get("LDL", 0)
    if variant.local or variant.stack or spills:
        variant.problems.append(
            f"spills: {variant.local} B local, {variant.stack} B stack, {spills} STL/LDL instructions"
        )
    if variant.dot16 and arch >= 90 and not variant.sass.get("HGMMA"):
        variant.problems.append("16-bit dot not lowered to wgmma (no HGMMA in the SASS)")


def _constexprs(kernel) -> str:
    """The upper-case constexprs of a compiled kernel (tiles, switches, and ints specialized to 1)."""
    arg_names = kernel.src.fn.arg_names
    names = []
    for key, value in (getattr(kernel.src, "constants", None) or {}).items():
        # Keyed by name in older triton, by argument-index path in newer.
        name = key if isinstance(key, str) else arg_names[key[0]]
        if name.isupper():
            names.append(f"{name}={value}")
    return " ".join(names)


def check(arch: int, ranks: tuple[int, ...], dump: Path | None = None) -> tuple[list[Variant], list[str]]:
    """Compile everything; returns (variants, harness errors)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if arch not in LIMITS:
        raise ValueError(f"--arch {arch} is not supported; accepted: {sorted(LIMITS)}")
    driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32), LIMITS[arch]["smem_block"]))
    jit_functions = _jit_functions()
    compiler = _Compiler(jit_functions)
    errors = []
    for label, call in _workloads(ranks):
        compiler.workload = label
        try:
            call()
        except Exception as err:  # noqa: BLE001 - every failure becomes a row of the report
            errors.append(f"{label}: {type(err).__name__}: {str(err)[:2000]}")
    variants: dict[str, Variant] = {}
    for name, workload, kernel in compiler.compiled:
        if kernel.hash in variants:
            if workload not in variants[kernel.hash].workloads:
                variants[kernel.hash].workloads.append(workload)
            continue
        md = kernel.metadata
        variant = Variant(
            kernel=name.rsplit(".", 1)[-1], workloads=[workload], constexprs=_constexprs(kernel),
            num_warps=md.num_warps, num_stages=md.num_stages, smem=md.shared,
            dot16=_sixteen_bit_dot(kernel.asm["ttir"]),
        )  # fmt: skip
        _read_cubin(variant, kernel.asm["cubin"])
        _judge(variant, arch)
        variants[kernel.hash] = variant
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            stem = dump / f"{variant.kernel}_{kernel.hash[:10]}"
            for ext in ("ttgir", "ptx"):
                stem.with_suffix(f".{ext}").write_text(kernel.asm[ext])
            stem.with_suffix(".cubin").write_bytes(kernel.asm["cubin"])
    never = sorted(set(jit_functions) - {name for name, _, _ in compiler.compiled})
    errors += [f"{name}: no workload compiled this kernel" for name in never]
    return list(variants.values()), errors


def report(variants: list[Variant], errors: list[str]) -> str:
    lines = [
        "| kernel | workloads | constexprs | warps/stages | regs | smem B | HGMMA | result |",
        "|" + "---|" * 8,
    ]
    for v in variants:
        where = v.workloads[0] + (f" (+{len(v.workloads) - 1})" if len(v.workloads) > 1 else "")
        result = "; ".join(v.problems) or "ok"
        lines.append(
            f"| {v.kernel} | {where} | {v.constexprs} | {v.num_warps}/{v.num_stages} | {v.regs} | {v.smem} | "
            f"{v.sass.get('HGMMA', 0)} | {result} |"
        )
    lines += [f"ERROR {e}" for e in errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels._aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help=f"compute capability, one of {sorted(LIMITS)}")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="subspace ranks k")
    parser.add_argument("--dump", type=Path, help="write TTGIR, PTX and cubin of every variant here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "resrl: error: unset TRITON_INTERPRET: the compile check needs Triton's compiler", file=sys.stderr
        )
        return 2
    try:
        ranks = tuple(int(k) for k in args.ranks.split(","))
    except ValueError:
        print(f"resrl: error: --ranks {args.ranks!r}: expected comma-separated ints", file=sys.stderr)
        return 2
    import torch
    import triton

    t0 = time.perf_counter()
    variants, errors = check(args.arch, ranks, args.dump)
    print(f"# sm_{args.arch}: triton {triton.__version__}, torch {torch.__version__}, "
          f"N,D,V = {SHAPE}, {len(variants)} variants in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(report(variants, errors))
    failed = [v for v in variants if v.problems]
    print(f"# {len(variants) - len(failed)} ok, {len(failed)} failing, {len(errors)} errors")
    if errors:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
