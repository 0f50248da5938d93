"""The update phase of a training step, two versions of the code side by side (issue 13: before
and after the LM head runs on response rows only with the loss inside the pass).

Each version is a `git archive` of a revision unpacked into a temporary folder; each run is a
fresh subprocess importing that version, which builds the trainer of the `tiny` preset (the
demo's model, batch and micro-batching) with its rollout replaced by a synthetic one of the same
shape (the demo's real prompts, 16 random responses each with lengths uniform in
[--response-min, rollout.max_new_tokens], half of each group positive), runs `--steps` steps and
reports the trainer's own `time/update_s` and `time/prepass_s` (the first step is a warm-up). The
versions alternate for `--rounds` rounds, so a busy machine slows them alike.

    python bench/bench_update.py --before 22ce43f^ --after HEAD [--record]
    python bench/bench_update.py ... --set model.vocab_size=151936   # any config override
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def child(root: str, steps: int, response_min: int, overrides: list[str]) -> None:
    sys.path.insert(0, root)
    from resrl.batch import RolloutBatch
    from resrl.config import resolve
    from resrl.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(
            "tiny",
            overrides=[
                "sft.steps=0",
                "eval.before=false",
                "run.tensorboard=false",
                "run.progress=false",
                f"run.out_dir={tmp}",
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        vocab = trainer.model.get_input_embeddings().num_embeddings
        top = cfg.rollout.max_new_tokens

        def rollout(slots, step):
            gen = torch.Generator().manual_seed(1000 * step + 7)
            prompts, responses, positive, groups = [], [], [], []
            for slot in slots:
                for j in range(cfg.rollout.n):
                    n = int(torch.randint(response_min, top + 1, (1,), generator=gen))
                    prompts.append(trainer.train_set.prompt_ids[slot])
                    responses.append(torch.randint(4, vocab, (n,), generator=gen).tolist())
                    positive.append(j % 2 == 0)
                    groups.append(step * 100_000 + slot)
            return RolloutBatch.scored(prompts, responses, positive, groups)

        trainer.rollout = rollout
        rows = []
        for step in range(steps):
            m = trainer.train_step(step)
            rows.append({k: m[k] for k in ("time/update_s", "time/prepass_s", "loss/pg", "optim/grad_norm")})
    print(json.dumps(rows))


def unpack(rev: str, into: Path) -> str:
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="22ce43f^", help="git revision of the 'before' code")
    p.add_argument("--after", default="HEAD", help="git revision of the 'after' code")
    p.add_argument("--steps", type=int, default=3, help="steps per run; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--response-min", type=int, default=12)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.vocab_size=151936")
    p.add_argument("--label", default="demo", help="name of this setting in the output")
    p.add_argument("--record", action="store_true", help="append rows to bench/results/update.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.response_min < 1:
        p.error("need --steps >= 2 (the first is a warm-up), --rounds >= 1 and --response-min >= 1")
    if args.child:
        child(args.child, args.steps, args.response_min, args.set)
        return []
    sys.path.insert(0, str(ROOT))
    from bench.common import append_results, environment

    env = environment(torch.device("cpu"))
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: Path(tmp) / name for name in results}
        shas = {name: unpack(getattr(args, name), roots[name]) for name in results}
        for _ in range(args.rounds):
            for name in results:
                cmd = [sys.executable, __file__, "--child", str(roots[name]), "--steps", str(args.steps),
                       "--response-min", str(args.response_min), *(f"--set={s}" for s in args.set)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=roots[name],
                                     env={**os.environ, "PYTHONPATH": str(roots[name])})  # fmt: skip
                if out.returncode != 0:
                    raise SystemExit(f"{name} ({shas[name]}) failed:\n{out.stderr[-3000:]}")
                results[name].extend(json.loads(out.stdout.strip().splitlines()[-1])[1:])
    rows = []
    print(f"{args.label}: {' '.join(args.set) or 'tiny preset'}; {env['device']}, torch {env['torch']}")
    print(
        f"{'code':8s} {'commit':14s} {'update s (median)':>18s} {'pre-pass s':>11s} {'loss/pg (last)':>15s}"
    )
    for name, runs in results.items():
        row = {
            "bench": "update_phase",
            "label": args.label,
            "code": name,
            "code_commit": shas[name],
            "overrides": args.set,
            "update_s": statistics.median(r["time/update_s"] for r in runs),
            "update_s_all": [r["time/update_s"] for r in runs],
            "prepass_s": statistics.median(r["time/prepass_s"] for r in runs),
            "loss_pg": runs[-1]["loss/pg"],
            "grad_norm": runs[-1]["optim/grad_norm"],
            **env,
        }
        rows.append(row)
        print(
            f"{name:8s} {shas[name]:14s} {row['update_s']:18.3f} {row['prepass_s']:11.3f} {row['loss_pg']:15.6f}"
        )
    print(f"after / before: update {rows[1]['update_s'] / rows[0]['update_s']:.2f}x")
    if args.record:
        print("recorded in", append_results("update.jsonl", rows))
    return rows


if __name__ == "__main__":
    main()
