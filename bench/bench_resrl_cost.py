"""ResRL's training cost against GRPO's on the demo's settings, side by side in one process (issue 16).

The `tiny` preset (the demo's model, 32 prompts x 16 responses, 256-sequence micro-batches) is
warm-started as the demo does; then `--batches` rollout batches are sampled from it once (the real
hf engine, real rewards). Each measured step restores the same starting weights and optimizer
state and runs `Trainer.train_step` on one of those batches (the rollout replaced by the stored
batch, so every variant computes on identical data), for the variants

- grpo: `algorithm.objective=grpo` (no pre-pass: the update is on-policy);
- resrl: ResRL as it runs now (`algorithm.resrl_weights=auto`: weights inside the update's own
  forward for groups a micro-batch holds whole, no second trunk forward);
- resrl-prepass: ResRL with `algorithm.resrl_weights=prepass` (the no-grad pre-pass forward: the
  path before issue 16).

The variants rotate within every round, so a busy machine slows them alike. Reported per variant:
the median over rounds and batches of the training time of a step (pre-pass + update, from the
trainer's own `time/*` metrics; rollout excluded, it is identical by construction), and the ratio
to GRPO's. The issue's target: resrl / grpo <= 1.1.

    python bench/bench_resrl_cost.py [--rounds 4] [--batches 3] [--record]
    python bench/bench_resrl_cost.py --set sft.steps=100       # any config override (smoke runs)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results, environment  # noqa: E402

VARIANTS = {
    "grpo": {"objective": "grpo"},
    "resrl": {"objective": "resrl", "resrl_weights": "auto"},
    "resrl-prepass": {"objective": "resrl", "resrl_weights": "prepass"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all variants and batches")
    parser.add_argument("--batches", type=int, default=3, help="rollout batches sampled once and reused")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. sft.steps=100")
    parser.add_argument(
        "--record", action="store_true", help="append the result to bench/results/resrl_cost.jsonl"
    )
    args = parser.parse_args()

    from resrl.config import resolve
    from resrl.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(
            "tiny",
            overrides=[
                "eval.before=false",
                "run.tensorboard=false",
                "run.progress=false",
                "run.device=cpu",
                f"run.out_dir={tmp}",
                *args.set,
            ],
        )
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        trainer.warm_start()
        print(f"warm start: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        batches = []
        for b in range(args.batches):
            slots = trainer.sampler.next()
            batches.append(trainer.rollout(slots, b))
        accuracy = [float(batch.positive.float().mean()) for batch in batches]
        print(f"sampled {args.batches} batches, accuracy {accuracy}", file=sys.stderr, flush=True)
        model_state = copy.deepcopy(trainer.model.state_dict())
        optim_state = copy.deepcopy(trainer.optimizer.state_dict())
        sched_state = copy.deepcopy(trainer.scheduler.state_dict())

        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        parts: dict[str, dict[str, list[float]]] = {v: {"prepass": [], "update": []} for v in VARIANTS}
        paths: dict[str, dict[str, float]] = {}
        names = list(VARIANTS)
        for r in range(args.rounds):
            for b, batch in enumerate(batches):
                # Rotate the order every round and batch: no variant always runs first.
                k = (r * len(batches) + b) % len(names)
                for name in names[k:] + names[:k]:
                    for key, value in VARIANTS[name].items():
                        setattr(trainer.cfg.algorithm, key, value)
                    trainer.model.load_state_dict(model_state)
                    trainer.optimizer.load_state_dict(optim_state)
                    trainer.scheduler.load_state_dict(sched_state)
                    trainer.rollout = lambda slots, step, batch=batch: copy.deepcopy(batch)
                    m = trainer.train_step(b)
                    seconds = m["time/prepass_s"] + m["time/update_s"]
                    times[name].append(seconds)
                    parts[name]["prepass"].append(m["time/prepass_s"])
                    parts[name]["update"].append(m["time/update_s"])
                    if name.startswith("resrl"):
                        paths[name] = {
                            k2: m[k2]
                            for k2 in ("resrl/groups_in_update", "resrl/groups_in_prepass")
                            if k2 in m
                        }
            med = {v: statistics.median(t) for v, t in times.items()}
            print(
                f"round {r + 1}: " + ", ".join(f"{v} {s:.3f} s" for v, s in med.items()),
                file=sys.stderr,
                flush=True,
            )

    med = {v: statistics.median(t) for v, t in times.items()}
    row = {
        "bench": "resrl_cost",
        "settings": "tiny preset (demo): 32 prompts x 16, micro-batch 256, warm-started",
        "overrides": args.set,
        "rounds": args.rounds,
        "batches": args.batches,
        "batch_accuracy": accuracy,
        "train_s_median": med,
        "prepass_s_median": {v: statistics.median(p["prepass"]) for v, p in parts.items()},
        "update_s_median": {v: statistics.median(p["update"]) for v, p in parts.items()},
        "train_s_all": times,
        "ratio_to_grpo": {v: med[v] / med["grpo"] for v in VARIANTS},
        "resrl_paths": paths,
        "environment": environment(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
    }
    print(
        "train time per step (pre-pass + update, median): "
        + ", ".join(f"{v} {med[v]:.3f} s ({row['ratio_to_grpo'][v]:.2f}x grpo)" for v in VARIANTS)
    )
    if args.record:
        append_results("resrl_cost.jsonl", [row])


if __name__ == "__main__":
    main()
