"""The algorithm comparison: the same task, warm start, budget, seeds and evaluation for each objective.

For every seed the warm start runs once and is exported; every variant then starts RL from that
same policy (`model.path` = the exported folder, `sft.steps=0`), so differences come from the
objective alone. Output in `<out_dir>/<name>/`: `compare.json` (every run's before/after summary),
`compare.md` (mean ± sample std over seeds) and `pass_at_k.png` (mean curves with ±std bands).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from resrl.config import resolve
from resrl.errors import InputError

# Variant name -> overrides on top of the shared config. ResRL twice: the subspace from the
# penultimate layer (the paper's choice) and from the LM-head input.
VARIANTS: dict[str, list[str]] = {
    "grpo": ["algorithm.objective=grpo"],
    "psr": ["algorithm.objective=psr"],
    "nsr": ["algorithm.objective=nsr"],
    "w_reinforce": ["algorithm.objective=w_reinforce"],
    "resrl": ["algorithm.objective=resrl", "algorithm.subspace_layer=penultimate"],
    "resrl-final": ["algorithm.objective=resrl", "algorithm.subspace_layer=final"],
    "ace": ["algorithm.objective=ace"],
    # R²PO (docs/ALGORITHMS.md §5) on GRPO: the same step budget, half of it training the rollout
    # head; with truncated IS against π_roll in stage B.
    "r2po": ["algorithm.objective=grpo", "r2po.enabled=true", "r2po.head_lr=1e-3"],
    "r2po-tis": ["algorithm.objective=grpo", "r2po.enabled=true", "r2po.head_lr=1e-3", "algorithm.tis_cap=2"],
}
TABLE_KEYS = ("pass@1", "avg@", "maj@", "distinct_correct_solutions")
LORA_SUFFIX = "-lora"
# Keys the comparison sets for every run, and why (a per-variant override of one would be ignored).
OWNED_KEYS = {
    "run.seed": "from --seeds",
    "run.out_dir": "the comparison's folder",
    "run.name": "<variant>-s<seed>",
    "model.path": "the shared warm start",
    "data.tokenizer": "the shared warm start's",
    "sft.steps": "0: the warm start is shared",
}


def variant_overrides(name: str) -> list[str]:
    """The overrides of a variant: one of VARIANTS, or one of them with `-lora<R>` appended (the same
    objective training LoRA adapters of rank R on top of the shared warm start, e.g. `resrl-lora8`)."""
    if name in VARIANTS:
        return list(VARIANTS[name])
    base, sep, rank = name.rpartition(LORA_SUFFIX)
    if sep and base in VARIANTS and rank.isdigit() and int(rank) > 0:
        return [*VARIANTS[base], f"model.lora_rank={int(rank)}"]
    raise InputError(
        f"unknown variant {name!r}; available: {', '.join(VARIANTS)}, each also as <variant>{LORA_SUFFIX}<rank>"
        f" (LoRA of that rank, e.g. resrl{LORA_SUFFIX}8)"
    )


def parse_variant_sets(items: list[str], variants: list[str]) -> dict[str, list[str]]:
    """`VARIANT:key=value` items (`--set`) -> {variant: [key=value, ...]}, for the named variants only."""
    out: dict[str, list[str]] = {}
    for item in items:
        variant, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise InputError(f"--set {item!r}: expected VARIANT:key=value, e.g. resrl-lora8:optim.lr=2e-3")
        if variant not in variants:
            raise InputError(
                f"--set {item!r}: variant {variant!r} is not among --variants ({', '.join(variants)})"
            )
        out.setdefault(variant, []).append(override)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_comparison(
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    *,
    variants: list[str],
    seeds: list[int],
    name: str = "compare",
    variant_sets: dict[str, list[str]] | None = None,
    warm_starts: str | Path | None = None,
) -> dict[str, Any]:
    """`variant_sets`: extra overrides per variant (e.g. its own learning rate), after the shared ones.
    `warm_starts`: the folder holding `warm_start-s<seed>` (another comparison's, to share its warm
    starts; one missing there is made there); default this comparison's own folder."""
    from resrl.guards import check_writable
    from resrl.trainer import Trainer

    if not variants:
        raise InputError(f"give at least one variant; available: {', '.join(VARIANTS)}")
    if not seeds:
        raise InputError("give at least one seed")
    if len(set(seeds)) < len(seeds) or len(set(variants)) < len(variants):
        raise InputError(f"seeds {seeds} and variants {variants} must not repeat")
    per_variant = {v: variant_overrides(v) + list((variant_sets or {}).get(v, [])) for v in variants}
    for variant, extra in (variant_sets or {}).items():
        for override in extra:
            key = override.partition("=")[0].strip()
            if key in OWNED_KEYS:
                raise InputError(
                    f"--set {variant}:{override}: the comparison sets {key} itself for every run "
                    f"({OWNED_KEYS[key]}); per-variant overrides take any other key"
                )
    for extra in variant_sets or {}:
        if extra not in per_variant:
            raise InputError(f"overrides given for {extra!r}, which is not among the variants {variants}")
    base = resolve(preset, config_file, overrides)
    for extra in per_variant.values():
        # A bad per-variant override is refused before any warm start runs.
        resolve(preset, config_file, [*overrides, *extra])
    root = check_writable(Path(base.run.out_dir) / name, what="config run.out_dir")
    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    starts = root if warm_starts is None else check_writable(Path(warm_starts), what="--warm-starts")
    for seed in seeds:
        start = starts / f"warm_start-s{seed}"
        if not (start / "config.json").is_file():
            warm = Trainer(
                resolve(
                    preset,
                    config_file,
                    [
                        *overrides,
                        f"run.seed={seed}",
                        f"run.out_dir={starts}",
                        f"run.name=warm_start-s{seed}-run",
                        "train.steps=1",
                    ],
                )
            )
            warm.warm_start()
            warm.export(start)
            # Its engine, metrics file and run-directory lock go before the variants run.
            warm.close()
        for variant in variants:
            cfg = resolve(
                preset,
                config_file,
                [
                    *overrides,
                    *per_variant[variant],
                    f"run.seed={seed}",
                    f"run.out_dir={root}",
                    f"run.name={variant}-s{seed}",
                    f"model.path={start}",
                    f"data.tokenizer={start}",
                    "sft.steps=0",
                ],
            )
            summary = (
                json.loads((root / cfg.run.name / "summary.json").read_text()) if _done(root, cfg) else None
            )
            if summary is None:
                trainer = Trainer(cfg)
                summary = trainer.fit()
                # Its engine goes before the next run builds one.
                trainer.close()
            results[variant][seed] = summary
    report = _report(results)
    (root / "compare.json").write_text(json.dumps({"runs": results, "report": report}, indent=1, default=str))
    (root / "compare.md").write_text(_markdown(report, seeds))
    _plot(report, root / "pass_at_k.png")
    return report


def _done(root: Path, cfg) -> bool:
    path = root / cfg.run.name / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("steps") == cfg.train.steps


def _report(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row: {metric: (mean, std)}}: the starting policy ("start") and every variant after RL.
    "start" is left out when the runs did not evaluate before RL (eval.before=false)."""
    report = {}
    first = next(iter(results.values()))
    befores = [s.get("eval_before") for s in first.values()]
    if all(befores):
        report["start"] = _aggregate(befores)
    for variant, by_seed in results.items():
        report[variant] = _aggregate([s["eval_after"] for s in by_seed.values()])
    return report


def _aggregate(summaries: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = [k for k in summaries[0] if "/" not in k and isinstance(summaries[0][k], int | float)]
    return {k: _mean_std([s[k] for s in summaries]) for k in keys}


def _markdown(report: dict, seeds: list[int]) -> str:
    some = next(iter(report.values()))
    ks = sorted(int(k[5:]) for k in some if k.startswith("pass@"))
    cols = [f"pass@{k}" for k in ks if k in (1, ks[-1]) or k == ks[len(ks) // 2]]
    cols += [k for k in some if k.startswith(("avg@", "maj@"))] + ["distinct_correct_solutions"]
    start = (
        "`start` is the shared warm-started policy before RL"
        if "start" in report
        else "no `start` row: the runs did not evaluate before RL (eval.before=false)"
    )
    lines = [
        f"mean ± std over seeds {seeds}; {start}",
        "",
        "| run | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row, metrics in report.items():
        lines.append(
            f"| {row} | " + " | ".join(f"{metrics[c][0]:.3f} ± {metrics[c][1]:.3f}" for c in cols) + " |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    from resrl.eval.plot import plot_pass_at_k

    curves = {row: {k: v[0] for k, v in m.items() if k.startswith("pass@")} for row, m in report.items()}
    bands = {row: {k: v[1] for k, v in m.items() if k.startswith("pass@")} for row, m in report.items()}
    plot_pass_at_k(curves, path, title="held-out pass@k after RL (mean ± std over seeds)", bands=bands)
