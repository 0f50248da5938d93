"""A hostile tester's probes (issue 23), each through the `resrl` command in a fresh process: a
user's mistake is one line, `resrl: error: ...`, exit code 2 and no traceback, checked before any
work where it can be; a warning is one `resrl: warning: ...` line; the help says what is true.

Model folders are a very small Qwen3 saved with the character tokenizer, then spoiled one way each.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from small import SMALL_RUN
from test_resume import SMALL, assert_one_line_error, run_cli

from resrl.config import RunError
from resrl.guards import out_of_memory_as_one_line
from resrl.tasks import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def resrl(tmp_path: Path, *args: str, inject: str = "") -> subprocess.CompletedProcess:
    return run_cli(tmp_path, inject, list(args))


def assert_eval_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """`assert_one_line_error` for `resrl eval`, whose progress (transformers' loading bar, its own
    lines per chunk) may come before the error."""
    progress = ("Loading weights:", "eval: ")
    kept = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith(progress))
    return assert_one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, kept), *fragments
    )


def train_args(out: Path, *extra: str) -> list[str]:
    """A one-step run without warm start or evaluation before RL, in `out`."""
    return ["train", "--preset", "tiny", *SMALL, "sft.steps=0", "train.steps=1", f"run.out_dir={out}", *extra]


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A good model folder and spoiled copies of it, by name."""
    from resrl.model import build_qwen3
    from resrl.tasks.arithmetic import build_char_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_char_tokenizer()
    shape = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}

    def save(name: str, vocab: int, tok) -> Path:
        build_qwen3(vocab, **shape, max_position_embeddings=128).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    out = {"full": save("full", len(tokenizer), tokenizer)}

    def copy(name: str) -> Path:
        return Path(shutil.copytree(out["full"], root / name))

    # config.json says 3 layers, the weights hold 2 (layer_types dropped: transformers then loads
    # with the third layer at random); 1 layer (a layer's weights unused); wider MLPs (shapes).
    out["layers3"] = _edit_config(copy("layers3"), num_hidden_layers=3, layer_types=None)
    out["layers1"] = _edit_config(copy("layers1"), num_hidden_layers=1, layer_types=None)
    out["wider"] = _edit_config(copy("wider"), intermediate_size=96)
    # 3 layers with layer_types still listing 2: transformers' own config validation fails.
    out["invalid"] = _edit_config(copy("invalid"), num_hidden_layers=3)
    out["small_vocab"] = save("small_vocab", len(tokenizer) - 4, tokenizer)
    plain = build_char_tokenizer()
    plain.chat_template = None
    out["no_template"] = save("no_template", len(tokenizer), plain)
    bare = build_char_tokenizer()
    bare.eos_token, bare.pad_token = None, None
    out["no_eos"] = copy("no_eos")
    bare.save_pretrained(out["no_eos"])
    return out


# ---------------------------------------------------------------------------- item 6: one line each


@pytest.mark.parametrize(
    ("folder", "fragments"),
    [
        pytest.param(
            "layers3",
            [
                "config.json does not match the weights: config.json has num_hidden_layers=3, the weights "
                "hold 2 layers; 11 parameters are missing from the weights and would start at random "
                "(model.layers.2."
            ],
            id="config-has-more-layers",
        ),
        pytest.param(
            "layers1",
            [
                "config.json has num_hidden_layers=1, the weights hold 2 layers; 11 weights have no place "
                "in the model and would be dropped (model.layers.1."
            ],
            id="config-has-fewer-layers",
        ),
        pytest.param(
            "wider",
            [
                "6 shapes differ and would start at random (model.layers.0.mlp.",
                "[64, 64] stored, [64, 96] configured",
            ],
            id="shapes",
        ),
        pytest.param(
            "invalid",
            ["config.json is not a valid model config (", "`num_hidden_layers` (3) must be equal to"],
            id="config-invalid",
        ),
    ],
)
def test_config_json_that_does_not_match_the_weights_is_refused(tmp_path, folders, folder, fragments):
    """transformers loads such a folder with a table of warnings and random parameters."""
    path = folders[folder]
    proc = resrl(tmp_path, *train_args(tmp_path, f"model.path={path}"))
    line = assert_one_line_error(proc, f"config model.path {path}: ", *fragments)
    assert "LOAD REPORT" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists(), line


def test_eval_refuses_a_model_whose_config_does_not_match_its_weights(tmp_path, folders):
    data = write_dataset(tmp_path / "d.jsonl", 2, seed=1)
    proc = resrl(tmp_path, "eval", "--model", str(folders["layers3"]), "--data", str(data), "--n", "1")
    assert_eval_error(proc, f"--model {folders['layers3']}: config.json does not match the weights")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, folders):
    """The model has 4 embedding rows fewer than the tokenizer has tokens (an index error on the
    first prompt that uses one, a device assert on CUDA)."""
    small = folders["small_vocab"]
    proc = resrl(tmp_path, *train_args(tmp_path, f"model.path={small}", f"data.tokenizer={folders['full']}"))
    assert_one_line_error(
        proc,
        f"config data.tokenizer {folders['full']}: the tokenizer has 55 tokens, more than the model's 51 "
        f"embedding rows (vocab_size in {small}/config.json)",
    )


def _rows(path: Path, problems: list[str]) -> Path:
    path.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in problems))
    return path


def test_context_shorter_than_prompt_plus_response_before_any_work(tmp_path):
    """Short training prompts, one long held-out prompt: it used to fail at the evaluation after RL."""
    train = _rows(tmp_path / "train.jsonl", ["1+1"] * 8)
    held_out = _rows(tmp_path / "held.jsonl", ["1+1", "+".join("1" * 16)])
    proc = resrl(
        tmp_path,
        *train_args(
            tmp_path,
            f"data.train_files=[{train}]",
            f"data.eval_files=[{held_out}]",
            "data.max_prompt_length=64",
            "model.max_position_embeddings=48",
            "rollout.max_new_tokens=20",
        ),
    )
    assert_one_line_error(
        proc,
        "config rollout.max_new_tokens=20: the longest prompt has 32 tokens (training 4, held-out 32), so "
        "prompt + response needs 52 positions, but the model has 48 positions "
        "(model.max_position_embeddings); lower rollout.max_new_tokens to at most 16, or drop long "
        "prompts with data.max_prompt_length (now 64)",
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_context_of_a_model_folder(tmp_path, folders):
    proc = resrl(
        tmp_path, *train_args(tmp_path, f"model.path={folders['full']}", "rollout.max_new_tokens=120")
    )
    assert_one_line_error(
        proc, f"the model has 128 positions (max_position_embeddings in {folders['full']}/config.json)"
    )


def test_chat_prompts_with_a_tokenizer_without_chat_template(tmp_path, folders):
    verl = write_dataset(tmp_path / "verl.jsonl", 4, seed=1, fmt="verl")
    path = folders["no_template"]
    args = train_args(
        tmp_path, f"model.path={path}", f"data.train_files=[{verl}]", f"data.eval_files=[{verl}]"
    )
    assert_one_line_error(
        resrl(tmp_path, *args),
        f"{verl}: its prompts are chat messages (lists of role/content), but the tokenizer of config "
        f"model.path {path} has no chat template",
    )
    proc = resrl(tmp_path, "eval", "--model", str(path), "--data", str(verl), "--n", "1")
    assert_eval_error(proc, "has a message-list prompt but the tokenizer has no chat_template")


def test_tokenizer_without_eos_or_pad(tmp_path, folders):
    path = folders["no_eos"]
    message = f"{path}: the tokenizer has no EOS token and no pad token to pad batches with, so a response"
    assert_one_line_error(resrl(tmp_path, *train_args(tmp_path, f"model.path={path}")), message)
    data = write_dataset(tmp_path / "d.jsonl", 2, seed=1)
    proc = resrl(tmp_path, "eval", "--model", str(path), "--data", str(data), "--n", "1")
    assert_eval_error(proc, f"--model {message}")


@pytest.fixture
def unwritable(tmp_path) -> Iterator[Path]:
    """A folder that cannot be created: under a read-only folder, or (as root, who writes anywhere
    else) under /sys."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked / "out"
        locked.chmod(0o700)
        return
    probe = Path("/sys/resrl-unwritable")
    try:
        probe.mkdir()
    except OSError:
        yield probe / "out"
        return
    probe.rmdir()
    pytest.skip("no folder here refuses root")


@pytest.mark.parametrize("command", ["data-export", "plot", "eval", "compare"])
def test_unwritable_output_folder(tmp_path, folders, unwritable, command):
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps({"pass@1": 0.5, "pass@2": 0.6}))
    data = write_dataset(tmp_path / "d.jsonl", 2, seed=1)
    argv, message = {
        "data-export": (
            ["data", "export", "--out", str(unwritable / "h.jsonl")],
            f"--out {unwritable / 'h.jsonl'}",
        ),
        "plot": (["plot", str(summary), "--out", str(unwritable / "p.png")], f"--out {unwritable / 'p.png'}"),
        "eval": (
            [
                "eval",
                "--model",
                str(folders["full"]),
                "--data",
                str(data),
                "--n",
                "1",
                "--out",
                str(unwritable),
            ],
            f"--out {unwritable}: cannot write there",
        ),
        "compare": (
            ["compare", "--variants", "grpo", "--seeds", "0", f"run.out_dir={unwritable}"],
            f"config run.out_dir {unwritable / 'compare'}: cannot write there",
        ),
    }[command]
    assert_eval_error(resrl(tmp_path, *argv), message)


OUT_OF_MEMORY = {
    "cuda": 'torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total '
    "capacity of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has "
    '78.12 GiB memory in use.")',
    "host": "MemoryError()",
}


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        pytest.param(
            "cuda",
            "out of accelerator memory in the update phase at step 1 (tried to allocate 2.00 GiB)",
            id="cuda",
        ),
        pytest.param("host", "out of host memory in the update phase at step 1 (MemoryError)", id="host"),
    ],
)
def test_out_of_memory_in_the_update_is_one_line_naming_the_knobs(tmp_path, kind, fragment):
    inject = f"""
    import torch
    def out_of_memory(self, *args, **kwargs):
        raise {OUT_OF_MEMORY[kind]}
    torch.optim.AdamW.step = out_of_memory
    """
    proc = resrl(tmp_path, *train_args(tmp_path), inject=inject)
    assert_one_line_error(
        proc,
        fragment,
        "lower train.micro_batch_size, or train.max_tokens_per_micro_batch with train.pack=true, or set "
        "model.gradient_checkpointing=true or train.cpu_offload=true",
    )


@pytest.mark.parametrize(
    ("phase", "knob"),
    [
        ("rollout", "rollout.max_batch_size (hf engine), rollout.gpu_memory_utilization (vllm)"),
        ("evaluation", "eval.n"),
        ("warm start", "sft.batch_size"),
        ("pre-pass", "train.micro_batch_size"),
    ],
)
def test_out_of_memory_names_each_phase_and_its_knobs(phase, knob):
    """The phases the trainer wraps in `out_of_memory_as_one_line`; torch's CPU allocator failing
    for real (a RuntimeError, not MemoryError: 2^60 bytes, beyond any address space) counts too."""
    where = f"out of host memory in the {phase} phase (tried to allocate 1073741824.00 GiB); "
    with pytest.raises(RunError, match=re.escape(where) + ".*" + re.escape(knob)):
        with out_of_memory_as_one_line(phase):
            torch.empty(2**60, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="a bug"), out_of_memory_as_one_line(phase):
        raise RuntimeError("a bug, not memory")


def test_out_of_memory_with_the_knobs_of_resrl_eval():
    with pytest.raises(
        RunError, match=r"in the evaluation phase \(MemoryError\); lower --n or --max-new-tokens$"
    ):
        with out_of_memory_as_one_line("evaluation", knobs="lower --n or --max-new-tokens"):
            raise MemoryError


def test_warnings_are_one_line(tmp_path):
    """Prompts longer than data.max_prompt_length are dropped with one `resrl: warning:` line per
    split, not Python's `file:line: UserWarning` and the source line under it."""
    proc = resrl(tmp_path, "data", "export", "data.max_prompt_length=11", "--out", str(tmp_path / "h.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "resrl: warning: 1868 of 4000 training prompts are longer than data.max_prompt_length=11 tokens and "
        "were dropped",
        "resrl: warning: 100 of 200 held-out prompts are longer than data.max_prompt_length=11 tokens and "
        "were dropped",
    ]


def test_non_utf8_line_names_its_row(tmp_path):
    """A text-mode file decodes ahead in blocks: the bad byte on line 41 was reported as row 1."""
    lines = [json.dumps({"problem": "1+1", "answer": "2"}).encode()] * 60
    lines[40] = b'{"problem": "caf\xe9", "answer": "2"}'
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    good = write_dataset(tmp_path / "ok.jsonl", 4, seed=1)
    proc = resrl(
        tmp_path, "train", f"data.train_files=[{bad}]", f"data.eval_files=[{good}]", f"run.out_dir={tmp_path}"
    )
    assert_one_line_error(proc, f"{bad}: row 41: field '<row>': not UTF-8 text (invalid continuation byte")


# ---------------------------------------------------------------------------- item 8: the help is true


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, str]:
    cwd = tmp_path_factory.mktemp("help")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for name, argv in {"top": ["--help"], "train": ["train", "--help"]}.items():
        proc = subprocess.run(
            [sys.executable, "-m", "resrl", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout
    return out


def test_top_level_help_names_every_command_with_an_example(helps):
    from resrl.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    # The description: its first line names the commands, the lines under it show one each.
    description = helps["top"].split("positional arguments:")[0].split("\n\n", 1)[1]
    first = description.splitlines()[0]
    for command in commands:
        assert command in first, (command, first)
        assert f"\nresrl {command} " in description, command


def test_preset_default_depends_on_config(helps):
    assert "named preset (default: tiny unless --config is given)" in " ".join(helps["train"].split())


def test_list_fields_show_lists_not_strings(helps, tmp_path):
    assert "data.train_files = []" in helps["train"] and "data.eval_files = []" in helps["train"]
    assert "'[]'" not in helps["train"]
    proc = resrl(tmp_path, "config", "data.train_files=[a.jsonl,b.jsonl]", "data.eval_files=c.jsonl")
    data = yaml.safe_load(proc.stdout)["data"]
    assert data["train_files"] == ["a.jsonl", "b.jsonl"] and data["eval_files"] == ["c.jsonl"]


def test_vllm_engine_help_says_every_rank_runs_one(helps):
    text = " ".join(helps["train"].split())
    assert "one process only" not in text
    assert "under torchrun every rank runs its own engine on its own device" in text


def test_evaluation_progress_under_torchrun_says_it_counts_rank_0s_share(tmp_path):
    """4 held-out problems over 2 processes: rank 0 samples 2 and used to print "2/4 problems"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    args = [
        *train_args(tmp_path, "run.progress=true"),
        "data.task_eval_size=4",
        "eval.max_problems=0",
        "rollout.max_new_tokens=8",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "resrl", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation after RL: 2/2 problems (rank 0's share of 4 over 2 processes)" in proc.stderr
    assert "2/4 problems" not in proc.stderr


# ---------------------------------------------------------------------------- compare without eval.before


def test_compare_without_the_evaluation_before_rl(tmp_path):
    """eval.before=false: no run has eval_before, so there is no `start` row (it was a TypeError)."""
    proc = resrl(
        tmp_path,
        "compare",
        "--variants",
        "grpo",
        "--seeds",
        "0",
        "--preset",
        "tiny",
        *SMALL_RUN,
        "train.steps=1",
        "eval.before=false",
        f"run.out_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "| grpo | " in table and "| start |" not in table and "no `start` row" in table
    report = json.loads((tmp_path / "compare" / "compare.json").read_text())["report"]
    assert set(report) == {"grpo"} and "pass@1" in report["grpo"]
    assert (tmp_path / "compare" / "pass_at_k.png").is_file()
