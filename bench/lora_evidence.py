"""LoRA against full fine-tuning on the tiny task: the table and the plot of README "LoRA".

Reads a comparison's `compare.json` (`resrl compare ... --variants grpo,resrl,grpo-lora1,...`) and
writes a markdown table (held-out pass@k, mean ± std over seeds, with each run's learning rate and
trained parameters) and one PNG with a panel per objective: the pass@k gain over the starting
policy of full fine-tuning and of each LoRA rank, paired by seed (each run minus its own seed's
start, which removes most of the seed spread), mean ± std over seeds.

    .venv/bin/python bench/lora_evidence.py runs/lora/compare.json --table docs/lora.md --plot docs/lora_pass_at_k.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_LORA = re.compile(r"^(?P<base>.+)-lora(?P<rank>\d+)$")
COLUMNS = ("pass@1", "pass@8", "pass@32", "maj@32", "distinct_correct_solutions")


def _split(variant: str) -> tuple[str, int]:
    """(objective variant, LoRA rank; 0 for full fine-tuning)."""
    m = _LORA.match(variant)
    return (m["base"], int(m["rank"])) if m else (variant, 0)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _config(root: Path, variant: str, seed: str) -> dict:
    return json.loads((root / f"{variant}-s{seed}" / "config.json").read_text())


def _trained_params(root: Path, variant: str, seed: str) -> int | None:
    """Trainable parameters of the run: the adapter's (final_adapter/) or the whole model's (final/)."""
    from safetensors import safe_open

    run = root / f"{variant}-s{seed}"
    files = list((run / "final_adapter").glob("*.safetensors")) or list((run / "final").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return total


def rows(compare: Path) -> list[dict]:
    data = json.loads(compare.read_text())
    root = compare.parent
    out = []
    runs = data["runs"]
    first = next(iter(runs.values()))
    seeds = sorted(first)
    befores = [first[s]["eval_before"] for s in seeds if first[s].get("eval_before")]
    if len(befores) == len(seeds):
        out.append({"run": "start", "objective": None, "rank": None, "lr": None, "params": None,
                    **{c: _stats([b[c] for b in befores]) for c in COLUMNS if c in befores[0]},
                    "pass@1 per seed": [b["pass@1"] for b in befores]})  # fmt: skip
    for variant, by_seed in runs.items():
        objective, rank = _split(variant)
        afters = [by_seed[s]["eval_after"] for s in seeds]
        lr = _config(root, variant, seeds[0])["optim"]["lr"]
        out.append(
            {
                "run": variant,
                "objective": objective,
                "rank": rank,
                "lr": lr,
                "params": _trained_params(root, variant, seeds[0]),
                **{c: _stats([a[c] for a in afters]) for c in COLUMNS if c in afters[0]},
                "pass@1 per seed": [a["pass@1"] for a in afters],
            }
        )
    return out


def table(rows_: list[dict]) -> str:
    cols = [c for c in COLUMNS if c in rows_[-1]]
    head = "| run | trained | lr | " + " | ".join(cols) + " | pass@1 per seed |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for r in rows_:
        trained = "" if r["rank"] is None else ("full" if r["rank"] == 0 else f"LoRA r={r['rank']}")
        if r["params"]:
            trained += f" ({r['params'] / 1e3:.1f} K)"
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        cells = " | ".join(f"{r[c][0]:.3f} ± {r[c][1]:.3f}" for c in cols)
        seeds = ", ".join(f"{v:.3f}" for v in r["pass@1 per seed"])
        lines.append(f"| {r['run']} | {trained} | {lr} | {cells} | {seeds} |")
    return "\n".join(lines) + "\n"


def plot(compare: Path, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = json.loads(compare.read_text())
    runs = data["runs"]
    objectives = list(dict.fromkeys(_split(v)[0] for v in runs))
    first = next(iter(runs.values()))
    seeds = sorted(first)
    fig = Figure(figsize=(5.0 * len(objectives), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(objectives), sharey=True, squeeze=False)[0]

    def curve(summaries: list[dict]) -> tuple[list[int], list[float], list[float]]:
        ks = sorted(int(k[5:]) for k in summaries[0] if k.startswith("pass@"))
        stats = [_stats([s[f"pass@{k}"] for s in summaries]) for k in ks]
        return ks, [m for m, _ in stats], [s for _, s in stats]

    befores = [first[s].get("eval_before") for s in seeds]
    if not all(befores):
        raise SystemExit(
            "lora_evidence: the runs did not evaluate before RL (eval.before=false); no gain to plot"
        )
    for ax, objective in zip(axes, objectives, strict=True):
        variants = sorted(
            (v for v in runs if _split(v)[0] == objective), key=lambda v: _split(v)[1] or 1 << 20
        )
        for variant in variants:
            ks = sorted(int(k[5:]) for k in befores[0] if k.startswith("pass@"))
            # Paired by seed: each run against its own seed's starting policy.
            gains = [[runs[variant][s]["eval_after"][f"pass@{k}"] - b[f"pass@{k}"] for s, b in zip(seeds, befores, strict=True)] for k in ks]  # fmt: skip
            mean = [statistics.fmean(g) for g in gains]
            std = [statistics.stdev(g) if len(g) > 1 else 0.0 for g in gains]
            rank = _split(variant)[1]
            label = "full fine-tuning" if rank == 0 else f"LoRA rank {rank}"
            (line,) = ax.plot(ks, mean, marker="o", markersize=3, label=label)
            ax.fill_between(ks, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.12)  # fmt: skip
        ax.axhline(0, color="k", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"{objective}: held-out pass@k gain over the start")
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"pass@k gain (mean ± std, seeds {','.join(seeds)})")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_json", type=Path)
    ap.add_argument("--table", type=Path, help="write the markdown table here (default: print it)")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    args = ap.parse_args()
    if not args.compare_json.is_file():
        print(
            f"lora_evidence: {args.compare_json} is not a file; pass a comparison's compare.json",
            file=sys.stderr,
        )
        return 2
    text = table(rows(args.compare_json))
    if args.table:
        args.table.write_text(text)
    print(text)
    if args.plot:
        plot(args.compare_json, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
