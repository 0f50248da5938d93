"""Benchmark `linear_logprob` against the compute floor and baselines run in the same process.

GPU (default when CUDA is present): shapes A (N=16384, D=2560, V=151936) and B (N=32768,
D=4096, V=151936) in bf16; forward and forward+backward time, peak extra memory, the floor
8·N·V·D FLOPs at the matmul rate measured in this run. Baselines: naive PyTorch (full logits),
torch's chunked `linear_cross_entropy` where the installed torch has it, Liger-Kernel's fused
linear cross-entropy and Cut Cross-Entropy (each skipped with its reason if not installed).
`--device cpu --shapes smoke` runs the same table on the CPU at a tiny shape (gpu_check's smoke).
With `--record` each row is appended the moment its case ends, with the test outcome it follows.

CPU (`--cpu`): the memory property at a size that fits a laptop: each implementation runs in a
fresh subprocess and reports its peak resident memory above the inputs.

Two-part (`--cpu --two-part [--d2 D2]`): R²PO's logits h·Wᵀ + h2·W2ᵀ through `linear_logprob(...,
hidden2=, weight2=)` against the same through the concatenated one-part call ([h | h2], [W | W2]),
PyTorch path, time of forward+backward and peak resident memory above the inputs and their
gradient buffers; with all four gradients and with the head's only (stage A: trunk and LM head
detached). Each case in a fresh process, `--rounds` alternating rounds (see `run_cpu_two_part`).

    python bench/bench_linear_logprob.py                 # GPU table
    python bench/bench_linear_logprob.py --record        # ... appended to bench/results/ after green tests
    python bench/bench_linear_logprob.py --device cpu --shapes smoke   # the GPU table's code on the CPU
    python bench/bench_linear_logprob.py --cpu           # CPU memory/time table
    python bench/bench_linear_logprob.py --cpu --two-part --record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    append_results,
    cuda_peak_extra_bytes,
    environment,
    matmul_tflops,
    require_green_tests,
    results_dir,
    summarize,
    time_ms,
)

# smoke: the table's code path on the CPU in seconds (V not a power of two).
SHAPES = {"A": (16384, 2560, 151936), "B": (32768, 4096, 151936), "smoke": (256, 64, 1000)}
CPU_SHAPE = (2048, 256, 32000)


def _ours(impl: str):
    def run(h, w, t):
        os.environ["RESRL_KERNEL_IMPL"] = impl
        from kernels import linear_logprob

        lp, _ = linear_logprob(h, w, t)
        return -lp.mean()

    return run


def _naive(h, w, t):
    logits = (h @ w.T).float()
    return -torch.log_softmax(logits, -1).gather(1, t[:, None]).mean()


def _torch_lce(h, w, t):
    options = torch.nn.LinearCrossEntropyOptions()
    return torch.nn.functional.linear_cross_entropy(h, w, t, options=options)


def _liger(h, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, w, t)


def _cce(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, t)


def implementations(device: torch.device) -> dict:
    impls = {"resrl-triton": _ours("triton"), "resrl-torch-chunked": _ours("torch"), "naive-pytorch": _naive}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        impls["torch-linear_cross_entropy-chunked"] = _torch_lce
    if device.type == "cuda":
        impls["liger-fused-linear-ce"] = _liger
        impls["cut-cross-entropy"] = _cce
    else:
        impls.pop("resrl-triton")  # the Triton interpreter is a correctness tool, not a timing one
    return impls


def measure(name, fn, n, d, v, dtype, device, reps) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(v, d, device=device, dtype=dtype, generator=g) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)

    def fwd():
        return fn(h, w, t)

    def fwdbwd():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    row = {"impl": name}
    try:
        row["ms_fwd"] = summarize(time_ms(fwd, device, reps=reps))
        row["ms_fwdbwd"] = summarize(time_ms(fwdbwd, device, reps=reps))
        h.grad = w.grad = None
        if device.type == "cuda":
            row["peak_mem_bytes"] = cuda_peak_extra_bytes(fwdbwd, device)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # a baseline that is missing or rejects the shape is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    h.grad = w.grad = None
    return row


def run_gpu(args, on_row=None) -> list[dict]:
    """The device table (CUDA, or the CPU at `--device cpu`); `on_row(row)` as each case ends."""
    device = torch.device(args.device)
    dtype = torch.bfloat16
    tflops = matmul_tflops(device, dtype, size=8192 if device.type == "cuda" else 256)
    env = environment(device)
    rows = []
    for shape in args.shapes:
        n, d, v = SHAPES[shape]
        floor_ms = 8 * n * v * d / (tflops * 1e12) * 1e3
        grad_bytes = (n * d + v * d) * torch.finfo(dtype).bits // 8
        print(f"\nshape {shape}: N={n} D={d} V={v} bf16 | matmul {tflops:.0f} TFLOP/s | "
              f"fwd+bwd floor {floor_ms:.1f} ms | grad buffers {grad_bytes / 2**20:.0f} MiB")  # fmt: skip
        print(f"{'impl':38s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'x floor':>8s} {'extra MiB':>10s}")
        for name, fn in implementations(device).items():
            row = measure(name, fn, n, d, v, dtype, device, args.reps)
            torch.cuda.empty_cache()
            row.update(bench="linear_logprob", shape=shape, n=n, d=d, v=v, dtype="bf16", floor_ms=floor_ms,
                       matmul_tflops=tflops, grad_bytes=grad_bytes, **env)  # fmt: skip
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if "error" in row:
                print(f"{name:38s} {row['error']}")
                continue
            fb = row["ms_fwdbwd"]["median"]
            extra = f"{row['peak_mem_bytes'] / 2**20:10.0f}" if "peak_mem_bytes" in row else f"{'-':>10s}"
            print(f"{name:38s} {row['ms_fwd']['median']:9.1f} {fb:11.1f} {fb / floor_ms:8.2f} {extra}")
    return rows


def _cpu_child(name: str, n: int, d: int, v: int, reps: int) -> None:
    """Runs in a fresh process: peak RSS above the inputs, and the time of fwd+bwd."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cpu")
    fn = implementations(device)[name]
    h = torch.randn(n, d).requires_grad_()
    w = (torch.randn(v, d) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    # Load the code paths on a tiny slice first so the baseline holds libraries and the
    # gradient buffers, and the peak above it is the implementation's workspace.
    fn(h[:8], w, t[:8]).backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = time_ms(lambda: fn(h, w, t).backward(), device, warmup=0, reps=reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": name, "ms_fwdbwd": summarize(times), "peak_mem_bytes": peak - base}))


def _two_part(h, w, h2, w2, t):
    from kernels import linear_logprob

    lp, _ = linear_logprob(h, w, t, hidden2=h2, weight2=w2)
    return -lp.mean()


def _concatenated(h, w, h2, w2, t):
    """R²PO v1: one [V, D+D2] weight copy (and its gradient) and one [N, D+D2] hidden per call."""
    from kernels import linear_logprob

    lp, _ = linear_logprob(torch.cat([h, h2], -1), torch.cat([w, w2], -1), t)
    return -lp.mean()


TWO_PART_IMPLS = {"resrl-torch-two-part": _two_part, "resrl-torch-concatenated": _concatenated}
# Which of (hidden, weight, hidden2, weight2) require grad: all, or R²PO's stage A (the head's only).
TWO_PART_GRADS = {"all": (True, True, True, True), "head": (False, False, True, True)}


def _two_part_child(name: str, grads: str, n: int, d: int, d2: int, v: int, reps: int) -> None:
    """Runs in a fresh process: peak RSS above the inputs and gradient buffers, and fwd+bwd time."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ["RESRL_KERNEL_IMPL"] = "torch"
    fn, needs = TWO_PART_IMPLS[name], TWO_PART_GRADS[grads]

    def tensors(n, v):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * d**-0.5,
              torch.relu(torch.randn(n, d2, generator=g)), torch.randn(v, d2, generator=g) * d2**-0.5]  # fmt: skip
        return [x.requires_grad_(need) for x, need in zip(xs, needs, strict=True)], torch.randint(0, v, (n,))

    # Load the code paths on a small problem (a warm-up at the full vocabulary would itself make
    # the concatenated copies, and the high-water mark would hide them), then hold the inputs and
    # the gradient buffers (torch.zeros writes its memory, so it is resident), so the peak above
    # that is each form's own workspace.
    small, t_small = tensors(8, 64)
    fn(*small, t_small).backward()
    xs, t = tensors(n, v)
    for x, need in zip(xs, needs, strict=True):
        if need:
            x.grad = torch.zeros_like(x)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = time_ms(lambda: fn(*xs, t).backward(), torch.device("cpu"), warmup=0, reps=reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": name, "grads": grads, "ms": times, "peak_mem_bytes": peak - base}))


def run_cpu_two_part(args) -> list[dict]:
    """Each (gradients, implementation) in its own process, `--rounds` times in alternation, so a
    load that changes during the run (a shared machine) falls on both forms alike. The children
    run with glibc's mmap threshold fixed at 1 MiB: by default it rises to 32 MiB after the first
    large free, and the 16 MiB chunk buffers then stay in the heap, so the peak RSS measured the
    allocator's retention (head-only above all four gradients in a first run) instead of the
    tensors alive at once."""
    n, d, v = args.cpu_shape
    d2 = args.d2 or d
    env = environment(torch.device("cpu"))
    cat_mib = (v + n) * (d + d2) * 4 / 2**20
    print(f"CPU two-part: N={n} D={d} D2={d2} V={v} fp32, {args.rounds} rounds x {args.reps} reps; "
          f"[V, D+D2] + [N, D+D2] copies are {cat_mib:.0f} MiB")  # fmt: skip
    child_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    cases = [(grads, name) for grads in TWO_PART_GRADS for name in TWO_PART_IMPLS]
    times = {case: [] for case in cases}
    peaks = {case: [] for case in cases}
    errors = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for grads, name in cases:
            cmd = [sys.executable, __file__, "--two-part-child", name, grads, "--cpu-shape", str(n), str(d),
                   str(v), "--d2", str(d2), "--reps", str(args.reps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
            if out.returncode != 0:
                errors[grads, name] = out.stderr.strip().splitlines()[-1][:160]
                continue
            child = json.loads(out.stdout.strip().splitlines()[-1])
            times[grads, name] += child["ms"]
            peaks[grads, name].append(child["peak_mem_bytes"])
    # The 1-minute load average before and after: on a shared machine the times are only comparable
    # between the forms of one run, not with rows recorded at another load.
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"load average (1 min) before/after: {load[0]} / {load[1]} on {os.cpu_count()} CPUs")
    print(f"{'impl':28s} {'grads':>6s} {'fwd+bwd ms':>11s} {'peak extra MiB':>15s}")
    rows = []
    for grads, name in cases:
        row = {"impl": name, "grads": grads}
        if (grads, name) in errors:
            row["error"] = errors[grads, name]
            print(f"{name:28s} {grads:>6s} {row['error']}")
        else:
            # The largest peak of the rounds: the memory a run of this form needs.
            row.update(ms_fwdbwd=summarize(times[grads, name]), peak_mem_bytes=max(peaks[grads, name]))
            print(f"{name:28s} {grads:>6s} {row['ms_fwdbwd']['median']:11.1f} "
                  f"{row['peak_mem_bytes'] / 2**20:15.0f}")  # fmt: skip
        row.update(bench="linear_logprob_two_part_cpu", shape="cpu", n=n, d=d, d2=d2, v=v, dtype="fp32",
                   rounds=args.rounds, malloc_mmap_threshold=2**20, loadavg_1m=load, cpus=os.cpu_count(),
                   **env)  # fmt: skip
        rows.append(row)
    return rows


def run_cpu(args, on_row=None) -> list[dict]:
    n, d, v = args.cpu_shape
    device = torch.device("cpu")
    env = environment(device)
    print(f"CPU: N={n} D={d} V={v} fp32; full logits alone are {n * v * 4 / 2**20:.0f} MiB")
    print(f"{'impl':38s} {'fwd+bwd ms':>11s} {'peak extra MiB':>15s}")
    rows = []
    for name in implementations(device):
        cmd = [sys.executable, __file__, "--cpu-child", name, "--cpu-shape", str(n), str(d), str(v),
               "--reps", str(args.reps)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            row = {"impl": name, "error": out.stderr.strip().splitlines()[-1][:160]}
            print(f"{name:38s} {row['error']}")
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:38s} {row['ms_fwdbwd']['median']:11.1f} {row['peak_mem_bytes'] / 2**20:15.0f}")
        row.update(bench="linear_logprob_cpu", shape="cpu", n=n, d=d, v=v, dtype="fp32", **env)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU memory-property mode (no GPU needed)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device table's device")
    p.add_argument("--shapes", nargs="+", default=["A", "B"], choices=list(SHAPES))
    p.add_argument("--cpu-shape", nargs=3, type=int, default=list(CPU_SHAPE), metavar=("N", "D", "V"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--record", action="store_true", help="append rows to bench/results/ (after green tests)")
    p.add_argument("--two-part", action="store_true", help="CPU: two-part vs concatenated rows (with --cpu)")
    p.add_argument("--d2", type=int, default=0, help="D2 of the second part (default: D)")
    p.add_argument("--rounds", type=int, default=3, help="--two-part: alternating rounds of all cases")
    p.add_argument("--cpu-child", help=argparse.SUPPRESS)
    p.add_argument("--two-part-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cpu_child:
        _cpu_child(args.cpu_child, *args.cpu_shape, args.reps)
        return
    if args.two_part_child:
        n, d, v = args.cpu_shape
        _two_part_child(*args.two_part_child, n, d, args.d2 or d, v, args.reps)
        return
    if args.two_part and not args.cpu:
        raise SystemExit("--two-part is a CPU table: pass --cpu too")
    if not args.cpu and args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the CPU memory table, or --device cpu")
    on_row = None
    if args.record:
        device_type = "cpu" if args.cpu else args.device
        tests = require_green_tests(
            ["tests/test_linear_logprob.py"]
            + (["tests/test_linear_logprob_two_part.py"] if args.two_part else []),
            device_type,
        )
        name = "linear_logprob_cpu.jsonl" if args.cpu else "linear_logprob.jsonl"

        def on_row(row: dict) -> None:
            append_results(name, [{**row, "tests": tests}])

    if args.two_part:
        rows = run_cpu_two_part(args)
        if on_row is not None:
            for row in rows:
                on_row(row)
    else:
        rows = run_cpu(args, on_row) if args.cpu else run_gpu(args, on_row)
    if args.record:
        print(f"appended {len(rows)} rows to {results_dir() / name}")
    else:
        med = [r["ms_fwdbwd"]["median"] for r in rows if "ms_fwdbwd" in r]
        if med:
            print(f"(not recorded; median of medians {statistics.median(med):.1f} ms; pass --record to keep)")


if __name__ == "__main__":
    main()
