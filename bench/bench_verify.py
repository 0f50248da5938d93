"""Verifier throughput: one training step's rewards with some pathological answers, serial vs pool.

A step of `--responses` answers (default 512: 32 prompts x 16, the tiny preset's step) in which a
share `--pathological` (default 10%) are answers math-verify cannot finish in time (power towers,
each different, so the per-step cache cannot fold them). The rest are what a math policy writes:
plain integers (decided in-process), and symbolic answers that need math-verify (a quarter of
them repeating an earlier answer to the same problem, which the cache verifies once).

  serial: `math_reward` per response, one after another (what the trainer did before).
  pool:   `math_rewards` (resrl.rewards.verify_batch): identical pairs once, up to `--workers`
          math-verify processes at a time.

Both give the same rewards (checked here). Prints seconds per step and the expected floor
(pathological / workers x time limit). `--record` appends the rows to
bench/results/verify_cpu.jsonl after the verifier tests pass.

  .venv/bin/python bench/bench_verify.py                    # ~3 min on 2 CPU cores
  .venv/bin/python bench/bench_verify.py --record
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results, git_commit, require_green_tests  # noqa: E402
from resrl.rewards import shutdown_verifier, verify_answer  # noqa: E402
from resrl.rewards.registry import math_rewards  # noqa: E402
from resrl.rewards.verify import DEFAULT_WORKERS  # noqa: E402


def make_step(n: int, pathological: float, seed: int = 0) -> tuple[list[str], list[str], int]:
    """(responses, ground truths, number of pathological responses) of one synthetic step."""
    rng = random.Random(seed)
    n_bad = round(n * pathological)
    responses, truths = [], []
    symbolic: list[tuple[str, str]] = []
    for i in range(n - n_bad):
        a = rng.randint(1, 9)
        if i % 2 == 0:
            # A plain integer: decided without math-verify.
            truth = str(a * 7)
            answer = truth if rng.random() < 0.5 else str(a * 7 + 1)
            responses.append(f"{a}*7={answer}\nAnswer: {answer}")
            truths.append(truth)
        elif symbolic and rng.random() < 0.25:
            # The same answer to the same problem as an earlier response of the step.
            response, truth = rng.choice(symbolic)
            responses.append(response)
            truths.append(truth)
        else:
            truth = f"\\frac{{{a}}}{{\\sqrt{{2}}}}"
            answer = f"\\frac{{{a}\\sqrt{{2}}}}{{2}}" if rng.random() < 0.5 else f"{a}x+{i}"
            symbolic.append((f"so \\boxed{{{answer}}}", truth))
            responses.append(symbolic[-1][0])
            truths.append(truth)
    for k in range(n_bad):
        # Distinct power towers: each one times out on its own.
        responses.append(f"\\boxed{{9^{{9^{{9^{{9^{{{9 + k}}}}}}}}}}}")
        truths.append("9")
    order = list(range(n))
    rng.shuffle(order)
    return [responses[i] for i in order], [truths[i] for i in order], n_bad


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--responses", type=int, default=512)
    parser.add_argument("--pathological", type=float, default=0.1, help="share of answers that time out")
    parser.add_argument("--timeout", type=float, default=2.0, help="verifier time limit per answer (s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--paths", default="serial,pool", help="comma-separated: serial, pool")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/verify_cpu.jsonl")
    args = parser.parse_args()
    if args.record:
        require_green_tests(["tests/test_rewards.py"])

    responses, truths, n_bad = make_step(args.responses, args.pathological)
    truncated = [False] * len(responses)
    # Timed from a cold start for both paths: worker start-up is part of a step's cost.
    runs = {
        # What math_reward does for one finished response, with the bench's time limit.
        "serial": lambda: [
            1.0 if verify_answer(r, t, timeout_s=args.timeout) else -1.0
            for r, t in zip(responses, truths, strict=True)
        ],
        "pool": lambda: math_rewards(
            responses,
            truths,
            truncated=truncated,
            negative_reward=-1.0,
            workers=args.workers,
            timeout_s=args.timeout,
        ),
    }
    rows, found = [], {}
    for path in args.paths.split(","):
        shutdown_verifier()
        t0 = time.perf_counter()
        found[path] = runs[path]()
        seconds = time.perf_counter() - t0
        row = {
            "bench": "verify_cpu",
            "path": path,
            "responses": len(responses),
            "pathological": n_bad,
            "timeout_s": args.timeout,
            "workers": args.workers if path == "pool" else 1,
            "seconds": round(seconds, 2),
            "floor_s": round(math.ceil(n_bad / (args.workers if path == "pool" else 1)) * args.timeout, 2),
            "accuracy": sum(r > 0 for r in found[path]) / len(responses),
            "cpus": os.cpu_count(),
            "device": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        rows.append(row)
        print(
            f"{path:>6}: {seconds:7.1f} s for {len(responses)} responses ({n_bad} pathological, "
            f"time limit {args.timeout} s, {row['workers']} worker(s)); floor {row['floor_s']} s",
            flush=True,
        )
    if len(found) == 2 and found["serial"] != found["pool"]:
        raise SystemExit("serial and pool rewards differ: not recording")
    if args.record:
        print(f"appended to {append_results('verify_cpu.jsonl', rows)}")


if __name__ == "__main__":
    main()
