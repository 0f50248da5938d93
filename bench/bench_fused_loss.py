"""The fused LM-head loss (`kernels.linear_logprob_loss`) against naive full logits, side by side.

Every implementation computes the same thing: log-probs and entropies of N tokens over a V-word
vocabulary, the trainer's per-token loss on them (`PolicyTokenLoss`: clipped surrogate with dual
clip against stale log-probs, token-mean), and the gradients w.r.t. hidden states and LM head:

- fused: `linear_logprob_loss` (PyTorch path: each chunk's logits become its gradient in place,
  6·N·V·D FLOPs, all in the forward);
- naive: full [N, V] fp32 logits, log-softmax, entropy, the loss, autograd's backward;
- chunked: `linear_logprob` then the loss through autograd (the update before issue 13:
  the backward recomputes the logits, 8·N·V·D).

Each run is a fresh subprocess that reports fwd+bwd wall time (median of `--reps`) and its peak
resident memory above the inputs and gradient buffers; the implementations alternate for
`--rounds` rounds so that a busy machine slows them alike. CPU, fp32, default N=4096, D=512,
V=65536 (full logits alone: 1 GiB).

    python bench/bench_fused_loss.py [--record]     # --record appends to bench/results/fused_loss_cpu.jsonl
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

from bench.common import append_results, environment, require_green_tests, summarize, time_ms  # noqa: E402

IMPLS = ("fused", "naive", "chunked")


def token_loss_for(n: int, gen: torch.Generator):
    from resrl.algorithms import PolicyTokenLoss

    adv = torch.randn(n, generator=gen)
    old = -5.0 - torch.rand(n, generator=gen) * 8
    return PolicyTokenLoss(adv, torch.full((n,), 1.0 / n), old_logprob=old)


def implementation(name: str):
    import kernels

    if name == "fused":
        return lambda h, w, t, fn: kernels.linear_logprob_loss(h, w, t, fn, with_entropy=True)[0]
    if name == "chunked":

        def chunked(h, w, t, fn):
            lp, ent = kernels.linear_logprob(h, w, t, return_entropy=True)
            return fn(lp, ent, slice(0, h.shape[0]))

        return chunked

    def naive(h, w, t, fn):
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        return fn(logp.gather(1, t[:, None]).squeeze(1), ent, slice(0, h.shape[0]))

    return naive


def child(name: str, n: int, d: int, v: int, reps: int) -> None:
    """In a fresh process: fwd+bwd times and peak RSS above inputs and gradient buffers."""
    os.environ["RESRL_KERNEL_IMPL"] = "torch"
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    fn = implementation(name)
    token_loss = token_loss_for(n, gen)
    # Warm the code paths on 8 tokens: libraries and the gradient buffers are in the baseline.
    fn(h[:8], w, t[:8], token_loss_for(8, gen)).backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step():
        h.grad = w.grad = None
        fn(h, w, t, token_loss).backward()

    times = time_ms(step, torch.device("cpu"), warmup=0, reps=reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        loss = float(fn(h, w, t, token_loss))
    print(
        json.dumps(
            {"impl": name, "ms_fwdbwd": summarize(times), "peak_extra_bytes": peak - base, "loss": loss}
        )
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs=3, type=int, default=[4096, 512, 65536], metavar=("N", "D", "V"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of: " + ", ".join(IMPLS))
    p.add_argument("--record", action="store_true", help="append rows to bench/results/ (after green tests)")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    n, d, v = args.shape
    if min(n, d, v) < 1 or args.reps < 1 or args.rounds < 1:
        p.error("--shape values, --reps and --rounds must be >= 1")
    if args.child:
        child(args.child, n, d, v, args.reps)
        return []
    impls = [i for i in args.impls.split(",") if i]
    if not impls or any(i not in IMPLS for i in impls):
        p.error(f"--impls {args.impls!r}: accepted: {', '.join(IMPLS)}")
    if args.record:
        require_green_tests(["tests/test_fused_loss.py"])
    env = environment(torch.device("cpu"))
    print(
        f"N={n} D={d} V={v} fp32, {os.cpu_count()} CPUs, RESRL_WORKSPACE_MB="
        f"{os.environ.get('RESRL_WORKSPACE_MB', '256')}; full logits alone are {n * v * 4 / 2**20:.0f} MiB"
    )
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for name in impls:
            cmd = [sys.executable, __file__, "--child", name, "--shape", str(n), str(d), str(v),
                   "--reps", str(args.reps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'impl':10s} {'fwd+bwd ms (median, per round)':>34s} {'peak extra MiB':>15s} {'loss':>12s}")
    rows = []
    for name in impls:
        per_round = [r["ms_fwdbwd"]["median"] for r in runs[name]]
        peak = max(r["peak_extra_bytes"] for r in runs[name])
        row = {
            "bench": "fused_loss_cpu",
            "impl": name,
            "n": n,
            "d": d,
            "v": v,
            "dtype": "fp32",
            "cpus": os.cpu_count(),
            "workspace_mb": float(os.environ.get("RESRL_WORKSPACE_MB", "256")),
            "ms_fwdbwd_median": statistics.median(per_round),
            "ms_fwdbwd_rounds": per_round,
            "peak_extra_bytes": peak,
            "loss": runs[name][0]["loss"],
            **env,
        }
        rows.append(row)
        rounds = ", ".join(f"{t:.0f}" for t in per_round)
        print(
            f"{name:10s} {row['ms_fwdbwd_median']:>12.0f} ({rounds:>18s}) {peak / 2**20:15.0f} {row['loss']:12.6f}"
        )
    by = {r["impl"]: r for r in rows}
    if "fused" in by and "naive" in by:
        f, nv = by["fused"], by["naive"]
        print(f"fused / naive: time {f['ms_fwdbwd_median'] / nv['ms_fwdbwd_median']:.2f}x, "
              f"extra memory {f['peak_extra_bytes'] / max(nv['peak_extra_bytes'], 1):.3f}x")  # fmt: skip
    if args.record:
        print("recorded in", append_results("fused_loss_cpu.jsonl", rows))
    return rows


if __name__ == "__main__":
    main()
