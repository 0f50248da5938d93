"""The `resrl` command line: train, eval, compare, config.

resrl train --preset tiny                         # the embedded default
resrl train --preset tiny algorithm.objective=grpo run.name=grpo
resrl train --config my.yaml optim.lr=2e-6        # file, then dotted overrides
resrl config --preset qwen3-4b-math-resrl         # print the resolved config (YAML)
resrl eval --model runs/tiny/final --data held_out.jsonl --n 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import yaml

from resrl.config import Config, ConfigError, resolve
from resrl.presets import PRESETS


def _fields_help() -> str:
    lines = ["config fields (section.field=value):"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(cls):
            doc = _field_doc(cls, f.name)
            lines.append(
                f"  {section.name}.{f.name} = {f.default if f.default is not dataclasses.MISSING else '[]'!r}"
            )
            if doc:
                lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field (read from the source)."""
    import ast
    import inspect

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return ""
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                return " ".join(str(nxt.value.value).split())
    return ""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="named preset (default: tiny)")
    p.add_argument("--config", type=Path, help="YAML or JSON config file, applied on top of the preset")
    p.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="dotted overrides, applied last"
    )


def _config(args: argparse.Namespace) -> Config:
    preset = args.preset or ("tiny" if args.config is None else None)
    return resolve(preset, args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from resrl.distributed import shutdown
    from resrl.trainer import Trainer

    cfg = _config(args)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.world.is_main:
        _print_table(summary)
        print(f"run directory: {Path(cfg.run.out_dir) / cfg.run.name}")
    # Under torchrun this leaves the process group and ends the process (see shutdown's docstring).
    shutdown(trainer.world)
    return 0


def _print_table(summary: dict) -> None:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in after if "/" not in k and (k.startswith(("pass@", "avg@", "maj@")))]
    keys += [k for k in ("distinct_correct_solutions", "mean_response_length") if k in after]
    print(f"\n{'metric':<28}{'before':>10}{'after':>10}{'change':>10}")
    for k in keys:
        b, a = before.get(k), after[k]
        change = f"{a - b:+10.3f}" if b is not None else f"{'':>10}"
        print(f"{k:<28}{'' if b is None else f'{b:10.3f}':>10}{a:10.3f}{change}")
    if summary.get("rl_seconds") is not None:
        sft = summary.get("sft", {}).get("sft/seconds", 0.0)
        print(
            f"training time on {summary.get('device')}: warm start {sft:.0f} s + RL {summary['rl_seconds']:.0f} s "
            f"= {summary['train_seconds']:.0f} s (evaluation not included)"
        )


def cmd_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resrl.config import RolloutConfig
    from resrl.data import load_examples
    from resrl.eval.evaluate import evaluate
    from resrl.loading import resolve_device
    from resrl.rollout import build_engine

    device = resolve_device(args.device)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"--model {model_dir}: not a Hugging Face model folder (no config.json); "
            "pass a run's final/ folder or an exported model"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    examples = [ex for path in args.data for ex in load_examples(path)]
    if args.max_problems:
        examples = examples[: args.max_problems]
    from resrl.data import encode_prompt

    longest = max(len(encode_prompt(ex, tokenizer)) for ex in examples)
    engine = build_engine(
        args.engine,
        model,
        tokenizer,
        RolloutConfig(engine=args.engine),
        model_dir=str(model_dir),
        max_model_len=longest + args.max_new_tokens,
        seed=args.seed,
    )
    result = evaluate(
        engine,
        examples,
        tokenizer,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        reward=args.reward,
        progress=True,
    )
    out = Path(args.out) if args.out else model_dir.parent / "eval"
    paths = result.write(out, name=args.name)
    if args.plot:
        from resrl.eval.plot import plot_pass_at_k

        plot_pass_at_k({args.name: result.summary}, out / f"{args.name}_pass_at_k.png")
    print(json.dumps({k: v for k, v in result.summary.items() if "/" not in k}, indent=1))
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from resrl.compare import run_comparison

    preset = args.preset or ("tiny" if args.config is None else None)
    run_comparison(
        preset, args.config, args.overrides, variants=args.variants, seeds=args.seeds, name=args.name
    )
    out = Path(resolve(preset, args.config, args.overrides).run.out_dir) / args.name
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'pass_at_k.png'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from resrl.eval.plot import load_curve, plot_pass_at_k

    curves = {}
    for spec in args.curves:
        label, _, source = spec.rpartition("=") if "=" in spec else ("", "", spec)
        curves[label or source] = load_curve(source)
    path = plot_pass_at_k(curves, args.out, title=args.title)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train a policy",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "config", help="print the resolved config", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    from resrl.compare import VARIANTS

    p = sub.add_parser(
        "compare",
        help="run several objectives x seeds from the same warm start; table + pass@k plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=list(VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)} (default: all)",
    )
    p.add_argument(
        "--seeds",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[0, 1, 2],
        help="comma-separated",
    )
    p.add_argument("--name", default="compare", help="folder under run.out_dir")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("plot", help="overlay pass@k curves of several evaluations in one PNG")
    p.add_argument(
        "curves",
        nargs="+",
        metavar="[LABEL=]FILE[:KEY]",
        help="an eval summary JSON, or a run's summary.json with :eval_before / :eval_after",
    )
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("eval", help="pass@k / avg@n / maj@n of a model on a dataset")
    p.add_argument("--model", required=True, help="Hugging Face model folder (e.g. runs/tiny/final)")
    p.add_argument("--data", required=True, nargs="+", help="dataset files (.jsonl/.json/.parquet)")
    p.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-problems", type=int, default=0, help="evaluate the first N problems (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="math")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: <model>/../eval)")
    p.add_argument("--name", default="eval", help="file name prefix of the outputs")
    p.add_argument("--plot", action="store_true", help="also write a pass@k curve PNG")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"resrl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
