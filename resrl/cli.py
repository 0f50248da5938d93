"""The `resrl` command line: train, eval, compare, plot, config, data, estimate.

resrl train --preset tiny                         # the embedded default (make demo)
resrl train --preset tiny algorithm.objective=grpo run.name=grpo
resrl train --config my.yaml optim.lr=2e-6        # file, then dotted overrides
resrl config --preset qwen3-4b-math-resrl         # print the resolved config (YAML)
resrl data export --preset tiny --out runs/tiny/held_out.jsonl   # the held-out split as JSONL
resrl eval --model runs/tiny/final --data runs/tiny/held_out.jsonl --n 16
resrl plot before=runs/tiny/summary.json:eval_before after=runs/tiny/summary.json:eval_after --out cmp.png
resrl compare --variants grpo,resrl --seeds 0,1,2  # objectives x seeds from one warm start
resrl estimate --model qwen3-4b --gpu-mem 80      # peak memory of one RL step, on the CPU

A mistake in the input (an argument, a config value, a data file, a model folder) is one line on
stderr, `resrl: error: ...`, and exit code 2; `--debug` adds the traceback. A traceback without
`--debug` is a bug. Algorithms: docs/ALGORITHMS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import textwrap
import traceback
from pathlib import Path

import yaml

from resrl import interrupt
from resrl.config import Config, ConfigError, resolve
from resrl.errors import InputError, MissingPackageError, UserError
from resrl.presets import PRESETS

# Exit code of every user error (argparse's own errors use it too).
USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other user error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"resrl: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USER_ERROR)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool = False):
    bounds = f"{'(' if low_open else '['}{low}, {high}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text!r}") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text}")
        return value

    return parse


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must not repeat, got {text!r}")
    return seeds


def _variant_list(text: str) -> list[str]:
    from resrl.compare import VARIANTS, variant_overrides

    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants:
        raise argparse.ArgumentTypeError(
            f"no variants in {text!r}; accepted: comma-separated from {','.join(VARIANTS)}"
        )
    for v in variants:
        try:
            variant_overrides(v)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(f"variants must not repeat, got {text!r}")
    return variants


def _fields_help() -> str:
    lines = ["config fields (section.field=value):"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(cls):
            doc = _field_doc(cls, f.name)
            # A list field's default comes from its factory (printed as [], not the string '[]').
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {section.name}.{f.name} = {default!r}")
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
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="named preset (default: tiny unless --config is given)"
    )
    p.add_argument("--config", type=Path, help="YAML or JSON config file, applied on top of the preset")
    p.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="dotted overrides, applied last"
    )


def _config(args: argparse.Namespace) -> Config:
    preset = args.preset or ("tiny" if args.config is None else None)
    return resolve(preset, args.config, args.overrides)


def _check_runnable(cfg: Config) -> None:
    """What the config names but cannot be checked on its own (a registered reward, an installed
    engine), checked before any model is built."""
    from resrl.rewards import get_reward

    try:
        get_reward(cfg.algorithm.reward)
    except InputError as e:
        raise ConfigError(f"config algorithm.reward: {e}") from None
    if cfg.rollout.engine == "vllm":
        _check_runnable_engine()


def cmd_train(args: argparse.Namespace) -> int:
    from resrl.distributed import shutdown
    from resrl.trainer import Trainer

    cfg = _config(args)
    _check_runnable(cfg)
    with interrupt.stoppable():
        trainer = Trainer(cfg)
        summary = trainer.fit()
    # The engine (and what it holds on disk: a LoRA run's served adapter), metrics and run lock.
    trainer.close()
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
    from transformers import AutoModelForCausalLM

    from resrl.config import RolloutConfig
    from resrl.data import encode_prompt, load_examples
    from resrl.eval.evaluate import evaluate
    from resrl.guards import check_writable, out_of_memory_as_one_line
    from resrl.loading import (
        check_model_folder,
        check_vocabulary,
        load_pretrained,
        load_tokenizer,
        resolve_device,
    )
    from resrl.rewards import get_reward
    from resrl.rollout import build_engine

    try:
        get_reward(args.reward)
    except InputError as e:
        raise InputError(f"--reward: {e}") from None
    if args.engine == "vllm":
        _check_runnable_engine()
    device = resolve_device(args.device)
    model_dir = Path(args.model)
    check_model_folder(args.model, what="--model", hub=False)
    # Named by the model evaluated (runs/x/final -> runs/x/eval/final_*), never over another
    # evaluation's files unless asked; checked before any work.
    name = args.name or model_dir.resolve().name
    out = Path(args.out) if args.out else model_dir.parent / "eval"
    outputs = [out / f"{name}_{part}" for part in ("summary.json", "samples.jsonl", "pass_at_k.png")]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise InputError(
            f"{existing[0]} exists (an earlier evaluation); pass --overwrite to replace it, or "
            "--name/--out to write elsewhere"
        )
    check_writable(out, what="--out")
    examples = [ex for path in args.data for ex in load_examples(path)]
    if args.max_problems:
        examples = examples[: args.max_problems]
    tokenizer = load_tokenizer(args.model, what="--model", hub=False)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    check_vocabulary(
        tokenizer,
        config.get("vocab_size"),
        source=f"--model {args.model}",
        where="vocab_size in its config.json",
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_pretrained(
        AutoModelForCausalLM, args.model, what="--model", part="config and weights", dtype=dtype
    ).to(device)
    longest = max(len(encode_prompt(ex, tokenizer)) for ex in examples)
    max_new_tokens = _response_cap(args.max_new_tokens, longest, model.config)
    engine = build_engine(
        args.engine,
        model,
        tokenizer,
        RolloutConfig(engine=args.engine),
        model_dir=str(model_dir),
        max_model_len=longest + max_new_tokens,
        seed=args.seed,
    )
    with (
        interrupt.stoppable(at_once=True),
        out_of_memory_as_one_line("evaluation", knobs="lower --n or --max-new-tokens"),
    ):
        try:
            result = evaluate(
                engine,
                examples,
                tokenizer,
                n=args.n,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=max_new_tokens,
                seed=args.seed,
                reward=args.reward,
                progress=True,
            )
        except interrupt.Stopped as e:
            raise interrupt.Stopped(
                e.signum, f"{e} during the evaluation of {model_dir}; nothing was written"
            ) from None
    # Which model and data the numbers are of.
    result.summary["model"] = str(model_dir.resolve())
    result.summary["data"] = [str(Path(p).resolve()) for p in args.data]
    paths = result.write(out, name=name)
    if args.plot:
        from resrl.eval.plot import plot_pass_at_k

        plot_pass_at_k({name: result.summary}, outputs[2])
    print(json.dumps({k: v for k, v in result.summary.items() if "/" not in k}, indent=1))
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


# The response cap when --max-new-tokens is not given and the model allows more.
DEFAULT_MAX_NEW_TOKENS = 1024


def _response_cap(asked: int | None, longest_prompt: int, model_config) -> int:
    """--max-new-tokens, or its default: DEFAULT_MAX_NEW_TOKENS or what the model's positions
    leave after the longest prompt, whichever is smaller."""
    positions = getattr(model_config, "max_position_embeddings", None)
    room = None if positions is None else positions - longest_prompt
    if room is not None and room < 1:
        raise InputError(
            f"--data: the longest prompt has {longest_prompt} tokens, the model only "
            f"{positions} positions (max_position_embeddings); no room for a response"
        )
    if asked is None:
        return DEFAULT_MAX_NEW_TOKENS if room is None else min(DEFAULT_MAX_NEW_TOKENS, room)
    if room is not None and asked > room:
        raise InputError(
            f"--max-new-tokens {asked}: with the longest prompt of {longest_prompt} tokens this needs "
            f"{longest_prompt + asked} positions, the model has {positions} (max_position_embeddings); "
            f"accepted: at most {room}, or leave it out for the default"
        )
    return asked


def _check_runnable_engine() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from resrl.rollout.vllm_engine import VLLM_MISSING

        raise MissingPackageError(VLLM_MISSING)


def cmd_compare(args: argparse.Namespace) -> int:
    from resrl.compare import run_comparison

    if not args.name or "/" in args.name or args.name in (".", ".."):
        raise InputError(f"--name: must be a plain folder name, got {args.name!r}")
    preset = args.preset or ("tiny" if args.config is None else None)
    cfg = resolve(preset, args.config, args.overrides)
    _check_runnable(cfg)
    # A stop is taken at a training step's end (the run's checkpoint); the same command resumes.
    from resrl.compare import parse_variant_sets

    sets = parse_variant_sets(args.set, args.variants)
    with interrupt.stoppable():
        run_comparison(
            preset,
            args.config,
            args.overrides,
            variants=args.variants,
            seeds=args.seeds,
            name=args.name,
            variant_sets=sets,
            warm_starts=args.warm_starts,
        )
    out = Path(cfg.run.out_dir) / args.name
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'pass_at_k.png'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from resrl.eval.plot import load_curve, plot_pass_at_k

    curves = {}
    for spec in args.curves:
        label, _, source = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if (label or source) in curves:
            raise InputError(f"curve label {label or source!r} given twice; name them LABEL=FILE")
        curves[label or source] = load_curve(source)
    try:
        path = plot_pass_at_k(curves, args.out, title=args.title)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot write the plot ({e.strerror or e})") from None
    print(f"wrote {path}")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from resrl.data import write_examples
    from resrl.loading import load_task

    cfg = _config(args)
    _tokenizer, train, held_out = load_task(cfg)
    if args.split == "train":
        examples = train.examples
    else:
        # Exactly the problems the trainer evaluates before and after RL.
        examples = held_out.examples[: cfg.eval.max_problems or None]
    try:
        path = write_examples(examples, args.out)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {len(examples)} {args.split} problems to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the subcommand; SUPPRESS keeps a subcommand's default
    # from overwriting a value given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a user error too",
    )
    parser = _Parser(prog="resrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Its own action: set_defaults would change the action the subcommands share.
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "train",
        help="train a policy",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "config",
        help="print the resolved config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    from resrl.compare import VARIANTS

    p = sub.add_parser(
        "compare",
        help="run several objectives x seeds from the same warm start; table + pass@k plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    _add_config_args(p)
    p.add_argument(
        "--variants",
        type=_variant_list,
        default=list(VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)} (default: all); any of them with -lora<R> "
        "appended trains LoRA adapters of rank R (e.g. resrl-lora8)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="an override for one variant only, repeatable (e.g. resrl-lora8:optim.lr=2e-3)",
    )
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="comma-separated ints (default 0,1,2)")
    p.add_argument("--name", default="compare", help="folder under run.out_dir")
    p.add_argument(
        "--warm-starts",
        default=None,
        metavar="DIR",
        help="share the warm starts (warm_start-s<seed>) of another comparison's folder, e.g. runs/compare",
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "plot", help="overlay pass@k curves of several evaluations in one PNG", parents=[debug]
    )
    p.add_argument(
        "curves",
        nargs="+",
        metavar="[LABEL=]FILE[:KEY]",
        help="an eval summary JSON, or a run's summary.json with :eval_before / :eval_after",
    )
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("eval", help="pass@k / avg@n / maj@n of a model on a dataset", parents=[debug])
    p.add_argument("--model", required=True, help="Hugging Face model folder (e.g. runs/tiny/final)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="dataset files (.jsonl/.json/.parquet); `resrl data export` writes a run's held-out split",
    )
    p.add_argument("--n", type=_int_at_least(1), default=16, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=0.95)
    p.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=None,
        help=f"response cap (default: {DEFAULT_MAX_NEW_TOKENS}, or what the model's "
        "max_position_embeddings leave after the longest prompt, whichever is smaller)",
    )
    p.add_argument(
        "--max-problems", type=_int_at_least(0), default=0, help="evaluate the first N problems (0: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reward",
        default="math",
        help="a registered reward (math), path/to/file.py:function or package.module:function",
    )
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: <model>/../eval)")
    p.add_argument(
        "--name", help="file name prefix of the outputs (default: the model folder's name, e.g. final)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation's files")
    p.add_argument("--plot", action="store_true", help="also write a pass@k curve PNG")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("data", help="dataset tools", parents=[debug])
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data_sub.add_parser(
        "export",
        help="write a config's training or held-out prompts as JSONL (the embedded task included)",
        description="Write the prompts a config trains or evaluates on as JSONL rows "
        "({prompt, answer, data_source, solution}) that `resrl eval --data` and data.*_files read. "
        "held_out is exactly what training evaluates before and after RL (eval.max_problems applied).",
        parents=[debug],
    )
    _add_config_args(p)
    p.add_argument("--split", choices=["held_out", "train"], default="held_out")
    p.add_argument("--out", required=True, help="JSONL path to write")
    p.set_defaults(func=cmd_data_export)
    p = sub.add_parser(
        "estimate",
        help="peak GPU and host memory of one RL step of a Qwen3 size, estimated on the CPU (fake tensors)",
        description="Peak memory per phase (load, pre-pass, update, optimizer) of one ResRL step on one "
        "rank, on the GPU and on the host, resrl's path and the reference recipe's (full fp32 logits, "
        "every layer's hidden states), as the trainer holds the model: bf16 compute with fp32 master "
        "weights, gradients and AdamW state under FSDP2 (16 B/param / world size), on the GPU or, with "
        "--offload, on the host; with --lora-rank, a frozen base in the compute dtype and fp32 adapters "
        "with their gradients and AdamW state. Batch defaults: the qwen3-4b-math-resrl preset. --json "
        "prints one object (schema: resrl/estimate.py).",
        parents=[debug],
    )
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="one or more of qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-14b, qwen3-32b",
    )
    p.add_argument(
        "--paths", default="resrl,reference", help="comma-separated: resrl, reference (default both)"
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="train.cpu_offload: masters, gradients, AdamW state on the host",
    )
    p.add_argument(
        "--world-size",
        "--gpus",
        type=_int_at_least(1),
        default=1,
        help="processes (one per GPU) FSDP2 shards over (default 1); figures are per rank",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype, model.dtype (default bfloat16; float32 on one GPU: the plain module)",
    )
    p.add_argument(
        "--kl-reference",
        action="store_true",
        help="a frozen reference model (algorithm.kl_coef > 0, or ACE), 2 B/param sharded like the policy",
    )
    p.add_argument(
        "--lora-rank",
        type=_int_at_least(0),
        default=0,
        help="model.lora_rank: LoRA adapters of this rank on a frozen base in the compute dtype (default 0: "
        "full fine-tuning)",
    )
    p.add_argument(
        "--optim",
        choices=["adamw", "adamw8bit", "adamw4bit", "adamw8bit-bnb"],
        default="adamw",
        help="optim.name: the optimizer whose state is counted (adamw 8 B/param; adamw8bit and adamw8bit-bnb "
        "~2.03; adamw4bit ~1.06; the last two only with --dtype float32, one GPU, no --offload)",
    )
    p.add_argument(
        "--gpu-mem",
        type=_float_in(0.0, 1e6, low_open=True),
        nargs="+",
        default=[80.0],
        help="GPU capacities to test, GiB (default 80); fits: peak <= capacity - reserve",
    )
    p.add_argument(
        "--reserve", type=_float_in(0.0, 1e6), default=2.0, help="GiB kept for CUDA context, workspaces (2)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the tables")
    for name, default, low in (
        ("prompts", 256, 1),
        ("n", 4, 1),
        ("mini-batch-prompts", 64, 1),
        ("prompt-len", 2048, 1),
        ("response-len", 4096, 1),
        ("micro-batch-size", 8, 1),
        ("micro-batch-tokens", 0, 0),
    ):
        p.add_argument(f"--{name}", type=_int_at_least(low), default=default, help=f"default {default}")
    p.add_argument("--positives", type=_int_at_least(0), help="positive responses per group (default n/2)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    p.set_defaults(func=cmd_estimate)
    return parser


def cmd_estimate(args: argparse.Namespace) -> int:
    from resrl.estimate import main as estimate_main

    return estimate_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UserError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"resrl: error: {_one_line(e)}", file=sys.stderr)
        return USER_ERROR
    except interrupt.Stopped as e:
        # Every rank stops the same way under torchrun; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"resrl: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # A Ctrl-C outside the commands' own handling (e.g. while arguments are read).
        print("resrl: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
