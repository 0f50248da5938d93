"""Benchmark the ResRL weight pipeline: subspace_basis + subspace_residual + residual_weights.

One rollout batch's worth of work: N tokens with hidden size D in G prompt groups (tokens
interleaved); half of each group's tokens are "positive" and feed that group's basis (capped at
--max-tokens), the other half are the valid negative tokens that get distances and weights.
Times are medians over --reps runs (CUDA events on GPU, so the device is synchronized), per phase
and in total, for each implementation: ours with RESRL_KERNEL_IMPL=triton and =torch, and the naive
reference (`kernels.reference`, exact SVD and an [N, D, k] gathered basis; skipped when it would
not fit). The residual column also gives the hidden-state read rate in GB/s.

    python bench/bench_subspace.py                                  # CUDA if present: N=16384 D=2560
    python bench/bench_subspace.py --device cpu                     # small CPU shape
    python bench/bench_subspace.py --n 32768 --d 4096 --groups 128 --rank 64

On CPU the Triton implementation runs only under TRITON_INTERPRET=1 (the interpreter: far slower,
a correctness path, not a speed one); it is skipped otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, time_ms  # noqa: E402
from kernels import reference  # noqa: E402

GPU_DEFAULTS = dict(n=16384, d=2560, groups=64, rank=64)
CPU_DEFAULTS = dict(n=2048, d=256, groups=8, rank=16)


def make_batch(n: int, d: int, groups: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Hidden states with a low-rank shared part per group, interleaved group ids, pos/neg split."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(groups, 32, d, generator=g)  # 32 shared directions per group
    group_index = torch.randint(0, groups, (n,), generator=g)
    coef = torch.randn(n, 32, generator=g)
    hidden = torch.einsum("nr,nrd->nd", coef, shared[group_index]) + 0.5 * torch.randn(n, d, generator=g)
    positive = torch.rand(n, generator=g) < 0.5
    pools = [hidden[(group_index == i) & positive].to(device=device, dtype=dtype) for i in range(groups)]
    return (
        hidden.to(device=device, dtype=dtype),
        group_index.to(device),
        (~positive).to(device),
        pools,
    )


def stack_bases(
    results: list[tuple[torch.Tensor, torch.Tensor]], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad each group's [D, k_g] basis to [D, rank] and stack: ([G, D, rank], [G, D])."""
    d = results[0][1].shape[0]
    device = results[0][1].device
    basis = torch.zeros(len(results), d, rank, device=device)
    for i, (b, _) in enumerate(results):
        basis[i, :, : b.shape[1]] = b
    return basis, torch.stack([m for _, m in results])


def pipeline(impl: str, rank: int, max_tokens: int) -> dict[str, Callable]:
    """Phase callables for one implementation; each phase takes the previous phase's output."""
    if impl == "reference":
        basis_fn, resid_fn, weight_fn = (
            reference.subspace_basis_reference,
            reference.subspace_residual_reference,
            reference.residual_weights_reference,
        )
    else:
        from kernels import residual_weights, subspace_basis, subspace_residual

        basis_fn, resid_fn, weight_fn = subspace_basis, subspace_residual, residual_weights

    def basis(pools):
        os.environ["RESRL_KERNEL_IMPL"] = impl if impl != "reference" else "torch"
        return stack_bases(
            [basis_fn(p, rank=rank, max_tokens=max_tokens, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(pools)],
            rank,
        )  # fmt: skip

    def residual(hidden, basis_GDK, mean_GD, group_index):
        os.environ["RESRL_KERNEL_IMPL"] = impl if impl != "reference" else "torch"
        return resid_fn(hidden, basis_GDK, mean_GD, group_index)

    def weights(dist, group_index, valid):
        os.environ["RESRL_KERNEL_IMPL"] = impl if impl != "reference" else "torch"
        return weight_fn(dist, group_index, valid)

    return {"basis": basis, "residual": residual, "weights": weights}


def reference_fits(n: int, d: int, rank: int, device: torch.device) -> tuple[bool, str]:
    need = 2 * 4 * n * d * rank  # gathered [N, D, k] basis and the projection back, fp32
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.8 * free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return need < 4 * 2**30, f"needs ~{need / 2**30:.1f} GiB (> 4 GiB CPU cap)"


def time_impl(
    impl: str,
    rank: int,
    args: argparse.Namespace,
    device: torch.device,
    hidden: torch.Tensor,  # [N, D]
    group_index: torch.Tensor,  # [N]
    valid: torch.Tensor,  # [N] bool
    pools: list[torch.Tensor],  # G x [M_g, D]
) -> tuple[float, float, float]:
    """Median ms of the basis, residual and weights phases of one implementation."""
    phases = pipeline(impl, rank, args.max_tokens)
    basis_GDK, mean_GD = phases["basis"](pools)
    dist = phases["residual"](hidden, basis_GDK, mean_GD, group_index)

    def timed(fn):
        return statistics.median(time_ms(fn, device, warmup=args.warmup, reps=args.reps))

    return (
        timed(lambda: phases["basis"](pools)),
        timed(lambda: phases["residual"](hidden, basis_GDK, mean_GD, group_index)),
        timed(lambda: phases["weights"](dist, group_index, valid)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--n", type=int, help="tokens in the batch")
    parser.add_argument("--d", type=int, help="hidden size")
    parser.add_argument("--groups", type=int, help="prompt groups")
    parser.add_argument("--rank", type=int, help="subspace rank k")
    parser.add_argument("--max-tokens", type=int, default=4096, help="positive pool cap per group")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch sees no CUDA device")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    n, d, groups, rank = (getattr(args, k) or defaults[k] for k in ("n", "d", "groups", "rank"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hidden, group_index, valid, pools = make_batch(n, d, groups, dtype, device)
    if min(pool.shape[0] for pool in pools) < 2:
        raise SystemExit("some group has fewer than 2 positive tokens: use fewer --groups or more --n")

    impls = ["triton", "torch", "reference"]
    saved_impl = os.environ.get("RESRL_KERNEL_IMPL")
    env = environment(device)
    print(f"device={env['device']} torch={env['torch']} triton={env['triton']} commit={env['commit']}")
    print(f"N={n} D={d} G={groups} rank={rank} max_tokens={args.max_tokens} dtype={args.dtype}")
    header = f"{'impl':<10} {'basis ms':>10} {'residual ms':>12} {'resid GB/s':>11} {'weights ms':>11} {'total ms':>10}"
    print(header)
    print("-" * len(header))
    hidden_bytes = hidden.numel() * hidden.element_size()
    for impl in impls:
        if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            print(f"{impl:<10} skipped: needs CUDA or TRITON_INTERPRET=1")
            continue
        if impl == "reference":
            fits, why = reference_fits(n, d, rank, device)
            if not fits:
                print(f"{impl:<10} skipped: {why}")
                continue
        t_basis, t_resid, t_weights = time_impl(impl, rank, args, device, hidden, group_index, valid, pools)
        total = t_basis + t_resid + t_weights
        rate = hidden_bytes / (t_resid * 1e-3) / 1e9
        print(f"{impl:<10} {t_basis:>10.2f} {t_resid:>12.2f} {rate:>11.3g} {t_weights:>11.2f} {total:>10.2f}")
    if saved_impl is None:
        os.environ.pop("RESRL_KERNEL_IMPL", None)
    else:
        os.environ["RESRL_KERNEL_IMPL"] = saved_impl


if __name__ == "__main__":
    main()
