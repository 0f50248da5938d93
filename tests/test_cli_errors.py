"""Every user error of the `resrl` command is one line, `resrl: error: ...`, and exit code 2.

In-process cases call `main` and read stderr; the subprocess cases check what a user sees from a
real process (exit code, no traceback), and that `--debug` adds the traceback.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resrl import cli
from resrl.cli import main
from resrl.tasks import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resrl: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _user_error(capsys, argv: list[str]) -> str:
    """main(argv) fails as a user error: exit code 2 (returned, or argparse's SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return _one_error_line(capsys)


def _data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ok.jsonl", 4, seed=1)


def _train_on(train: Path, held_out: Path) -> list[str]:
    out = held_out.parent if held_out.is_file() else held_out
    return ["train", f"data.train_files=[{train}]", f"data.eval_files=[{held_out}]", f"run.out_dir={out}"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        pytest.param(
            '{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n',
            "rows.jsonl",
            "rows.jsonl: row 2: field 'answer': missing",
            id="missing-field",
        ),
        pytest.param(
            '{"problem": "1+1", "answer": "2"}\n{"problem": \n',
            "rows.jsonl",
            "rows.jsonl: row 2: field '<row>': not valid JSON",
            id="bad-json-line",
        ),
        pytest.param(
            "PAR1 but not really",
            "fake.parquet",
            "fake.parquet: not a readable Parquet file (",
            id="fake-parquet",
        ),
        pytest.param(
            b"\xff\xfe\x00bad", "latin.jsonl", "latin.jsonl: row 1: field '<row>': not UTF-8", id="not-utf8"
        ),
        pytest.param(
            "x", "rows.csv", "unsupported file type '.csv'; accepted: .jsonl, .json, .parquet", id="suffix"
        ),
    ],
)
def test_data_errors_name_file_row_and_field(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    line = _user_error(capsys, _train_on(path, _data(tmp_path)))
    assert message in line


def test_missing_and_unreadable_data_files(tmp_path, capsys):
    line = _user_error(capsys, _train_on(tmp_path / "nope.jsonl", _data(tmp_path)))
    assert line == f"resrl: error: dataset file not found: {tmp_path / 'nope.jsonl'}"
    line = _user_error(capsys, _train_on(_data(tmp_path), tmp_path))
    assert "a folder, not a dataset file" in line
    if os.geteuid() != 0:  # root reads any file
        locked = _data(tmp_path)
        locked.chmod(0)
        assert "cannot be read" in _user_error(capsys, _train_on(locked, locked))


def test_unknown_reward_before_any_model_is_built(capsys):
    line = _user_error(capsys, ["train", "algorithm.reward=nope"])
    assert line == "resrl: error: config algorithm.reward: unknown reward 'nope'; available: math"


def test_vllm_engine_without_vllm(capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    line = _user_error(capsys, ["train", "rollout.engine=vllm"])
    assert "the vllm package is not installed here" in line and "rollout.engine=hf" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["compare", "--variants", "grpo,ppo"], "unknown variant 'ppo'; available: grpo", id="variant"
        ),
        pytest.param(["compare", "--seeds", "0,x"], "expected comma-separated ints", id="seeds-not-int"),
        pytest.param(["compare", "--seeds", "1,1"], "seeds must not repeat", id="seeds-repeat"),
        pytest.param(["compare", "--name", "a/b"], "--name: must be a plain folder name", id="name"),
        pytest.param(["train", "--preset", "big"], "argument --preset: invalid choice: 'big'", id="preset"),
        pytest.param(["train", "rollout.n=0"], "config rollout.n: must be >= 1", id="config-value"),
        pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="command"),
        pytest.param(
            ["plot", "--out", "x.png"],
            "the following arguments are required: [LABEL=]FILE[:KEY]",
            id="plot-args",
        ),
        pytest.param(
            ["eval", "--model", "m"], "the following arguments are required: --data", id="eval-args"
        ),
        pytest.param(
            ["eval", "--model", "m", "--data", "d", "--n", "0"], "expected an int >= 1, got 0", id="n"
        ),
        pytest.param(
            ["eval", "--model", "m", "--data", "d", "--top-p", "0"],
            "expected a number in (0.0, 1.0]",
            id="top-p",
        ),
        pytest.param(
            ["eval", "--model", "m", "--data", "d", "--temperature", "nan"],
            "expected a number in",
            id="temperature",
        ),
    ],
)
def test_argument_errors(capsys, argv, message):
    assert message in _user_error(capsys, argv)


def test_plot_errors(tmp_path, capsys):
    line = _user_error(capsys, ["plot", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.png")])
    assert "summary file not found" in line
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _user_error(capsys, ["plot", str(bad), "--out", str(tmp_path / "p.png")])
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"pass@1": 0.5}))
    line = _user_error(capsys, ["plot", f"a={good}", f"a={good}", "--out", str(tmp_path / "p.png")])
    assert "curve label 'a' given twice" in line
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _user_error(capsys, ["plot", str(good), "--out", str(blocker / "p.png")])
    assert line.startswith(f"resrl: error: --out {blocker / 'p.png'}: cannot write the plot")


def _model_folder(tmp_path: Path, parts: set[str], capsys) -> Path:
    """A folder with some of the parts of the tiny model's export."""
    from resrl.model import build_qwen3
    from resrl.tasks.arithmetic import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    full = tmp_path / "full"
    if not full.is_dir():
        build_qwen3(len(tokenizer), hidden_size=64, num_layers=1, intermediate_size=64).save_pretrained(full)
        tokenizer.save_pretrained(full)
    folder = tmp_path / "-".join(sorted(parts))
    folder.mkdir()
    names = {
        "config": ["config.json"],
        "weights": ["model.safetensors"],
        "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
    }
    for part in parts:
        for name in names[part]:
            (folder / name).write_bytes((full / name).read_bytes())
    capsys.readouterr()  # save_pretrained's progress bar
    return folder


@pytest.mark.parametrize(
    ("parts", "missing"),
    [
        pytest.param({"config", "tokenizer"}, "weights", id="no-weights"),
        pytest.param({"weights", "tokenizer"}, "config", id="no-config"),
        pytest.param({"config", "weights"}, "tokenizer", id="no-tokenizer"),
        pytest.param({"config"}, "weights and tokenizer", id="config-only"),
    ],
)
def test_eval_model_folder_says_what_is_missing(tmp_path, capsys, parts, missing):
    folder = _model_folder(tmp_path, parts, capsys)
    line = _user_error(capsys, ["eval", "--model", str(folder), "--data", str(_data(tmp_path))])
    assert f"--model {folder}: not a complete Hugging Face model folder, missing the {missing} (" in line


def test_model_folder_missing_or_corrupt(tmp_path, capsys):
    data = str(_data(tmp_path))
    line = _user_error(capsys, ["eval", "--model", str(tmp_path / "gone"), "--data", data])
    assert line.startswith(f"resrl: error: --model {tmp_path / 'gone'}: no such folder")
    # In training, a missing model.path was reported as "Repo id must be in the form ...".
    line = _user_error(
        capsys, ["train", f"model.path={tmp_path / 'gone' / 'final'}", f"run.out_dir={tmp_path}"]
    )
    assert line.startswith(f"resrl: error: config model.path {tmp_path / 'gone' / 'final'}: no such folder")
    folder = _model_folder(tmp_path, {"config", "weights", "tokenizer"}, capsys)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    line = _user_error(capsys, ["eval", "--model", str(folder), "--data", data])
    assert f"--model {folder}: cannot load the config and weights (" in line
    (folder / "config.json").write_text("{oops")
    line = _user_error(capsys, ["train", f"model.path={folder}", f"run.out_dir={tmp_path}"])
    assert f"config model.path {folder}: config.json is unreadable" in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["config"])


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "resrl", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_process_exit_code_and_debug_traceback(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    argv = ["train", f"data.train_files=[{fake}]", f"data.eval_files=[{fake}]", f"run.out_dir={tmp_path}"]
    done = _run(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"resrl: error: {fake}: not a readable Parquet file (")
    assert "Traceback" not in done.stderr
    debug = _run("--debug", *argv, cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "pyarrow" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"resrl: error: {fake}: not a readable Parquet")
    # --debug also goes after the subcommand.
    after = _run("config", "--debug", "rollout.n=0", cwd=tmp_path)
    assert after.returncode == 2 and "Traceback (most recent call last)" in after.stderr
    assert after.stderr.strip().splitlines()[-1] == "resrl: error: config rollout.n: must be >= 1, got 0"
