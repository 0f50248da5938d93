"""A run directory is held by one process, nothing is overwritten by accident, a stop asked for with
Ctrl-C or SIGTERM is an answer, and the resume rules match use (issue: hostile tester, round two).
Each probe runs the CLI in a subprocess, as a user would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small import SMALL_RUN

from resrl import checkpoint
from resrl.config import RESUME_SAFE_KEYS, ConfigError, resolve, resume_changes
from resrl.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "eval.before=false",
    "run.device=cpu",
    "run.name=run",
]


def _cmd(out, *extra) -> list[str]:
    return [sys.executable, "-m", "resrl", "train", "--preset", "tiny", *SMALL, f"run.out_dir={out}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _start(cmd, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.1)


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


# ---------------------------------------------------------------------------- one holder


def test_a_second_train_on_a_held_run_directory_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    first = _start(_cmd(tmp_path, "sft.steps=100000", "sft.checkpoint_every=0"), tmp_path)
    lock = tmp_path / "run" / ".lock"
    try:
        _wait_for(lambda: lock.is_file() and lock.read_text().strip(), first)
        second = _run(_cmd(tmp_path), tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert f"run directory {tmp_path / 'run'} is in use by process {first.pid}" in lines[0]
    finally:
        first.kill()
        first.wait()
    # kill -9 leaves the file but not the lock: the next run goes ahead.
    third = _run(_cmd(tmp_path, "train.steps=1", "run.resume=false"), tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run(_cmd(blocker), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "config run.out_dir: cannot create or write the run directory" in proc.stderr


# ---------------------------------------------------------------------------- stops


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_rl_checkpoints_the_finished_step_and_resumes_to_the_same_run(tmp_path, sig, code):
    steps = ["train.steps=4", "run.checkpoint_every=0"]
    whole = tmp_path / "whole"
    whole.mkdir()
    assert _run(_cmd(whole, *steps), whole).returncode == 0

    part = tmp_path / "part"
    part.mkdir()
    proc = _start(_cmd(part, *steps), part)
    metrics = part / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("resrl: stopped")]
    assert len(line) == 1 and f"stopped by {signal.Signals(sig).name} after step" in line[0]
    assert "run the same command again to resume" in line[0]
    done = _metric_steps(part / "run")
    assert checkpoint.latest(part / "run").name == f"step_{done[-1]:06d}"

    resumed = _run(_cmd(part, *steps), part)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metric_steps(part / "run") == [1, 2, 3, 4]
    a, b = _final_weights(whole / "run"), _final_weights(part / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_during_the_warm_start_resumes_it_where_it_stopped(tmp_path):
    """A run stopped during the warm start goes on from the stop, not from zero, and ends with the
    weights of a run never stopped."""
    warm = ["sft.steps=400", "sft.checkpoint_every=50", "train.steps=1"]
    whole = tmp_path / "whole"
    whole.mkdir()
    assert _run(_cmd(whole, *warm), whole).returncode == 0

    part = tmp_path / "part"
    part.mkdir()
    proc = _start(_cmd(part, *warm), part)
    # Its first checkpoint (warm-start step 50) is written: it is under way.
    _wait_for(lambda: (part / "run" / "checkpoints" / "latest").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "stopped by SIGINT during the warm start, after its step" in err
    stopped_at = int(err.split("after its step ")[1].split()[0])
    assert 50 <= stopped_at < 400

    resumed = _run(_cmd(part, *warm), part)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the warm start from its step {stopped_at}" in resumed.stderr
    a, b = _final_weights(whole / "run"), _final_weights(part / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- nothing overwritten


def test_final_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    trainer = Trainer(resolve("tiny", overrides=[*SMALL, "sft.steps=0", f"run.out_dir={tmp_path}"]))
    final = tmp_path / "final"
    trainer.export(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    from transformers import PreTrainedModel

    def dies_half_way(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    with pytest.raises(OSError):
        trainer.export(final)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before


def test_eval_names_outputs_by_model_and_never_overwrites(tmp_path):
    run = _run(_cmd(tmp_path, "train.steps=1"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    parent = tmp_path / "run"
    shutil.copytree(parent / "final", parent / "other")
    data = tmp_path / "held.jsonl"
    export = [
        sys.executable,
        "-m",
        "resrl",
        "data",
        "export",
        "--preset",
        "tiny",
        *SMALL,
        f"run.out_dir={tmp_path}",
    ]
    assert _run([*export, "--out", str(data)], tmp_path).returncode == 0
    base = [sys.executable, "-m", "resrl", "eval", "--data", str(data), "--n", "2", "--max-problems", "2"]
    for model in ("final", "other"):
        assert _run([*base, "--model", str(parent / model)], tmp_path).returncode == 0
        summary = json.loads((parent / "eval" / f"{model}_summary.json").read_text())
        assert summary["model"] == str((parent / model).resolve())
    again = _run([*base, "--model", str(parent / "final")], tmp_path)
    assert (
        again.returncode == 2
        and "final_summary.json exists" in again.stderr
        and "--overwrite" in again.stderr
    )
    assert _run([*base, "--model", str(parent / "final"), "--overwrite"], tmp_path).returncode == 0


# ---------------------------------------------------------------------------- resume rules


def test_run_device_may_change_on_resume():
    saved = resolve("tiny", overrides=["run.device=cuda"]).to_dict()
    assert resume_changes(saved, resolve("tiny", overrides=["run.device=cpu"]), "ckpt") == {}


def test_a_moved_base_model_folder_resumes_when_its_shapes_match(tmp_path):
    """model.path names a folder that was moved: no run.resume=force needed for a path alone; a
    folder of other shapes is still refused."""
    start = _run(_cmd(tmp_path, "train.steps=1", "run.name=base"), tmp_path)
    assert start.returncode == 0, start.stderr[-3000:]
    base = tmp_path / "base" / "final"
    ft = ["sft.steps=0", f"model.path={base}", "run.name=ft", "run.checkpoint_every=1"]
    assert _run(_cmd(tmp_path, *ft, "train.steps=1"), tmp_path).returncode == 0
    moved = tmp_path / "moved"
    base.rename(moved)
    ft_moved = [*ft[:1], f"model.path={moved}", *ft[2:]]
    resumed = _run(_cmd(tmp_path, *ft_moved, "train.steps=2"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 1" in resumed.stderr
    # A folder of another shape: refused in one line, as before, before any model is built.
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    ft_other = [*ft[:1], f"model.path={other}", *ft[2:]]
    refused = _run(_cmd(tmp_path, *ft_other, "train.steps=3"), tmp_path)
    assert refused.returncode == 2 and "model.path" in refused.stderr and "fixes the shape" in refused.stderr


def test_readme_lists_exactly_the_resume_safe_keys():
    text = (ROOT / "README.md").read_text()
    section = text.split("- **What may change.**")[1].split("\n- **")[0]
    listed = {k for k in section.split("`")[1::2] if "." in k and " " not in k and not k.startswith("resrl.")}
    assert listed == set(RESUME_SAFE_KEYS)


def test_rl_seconds_add_up_across_a_kill(tmp_path):
    """A run killed right after its checkpoint at step 1 (the process ends as under kill -9) and
    resumed counts the time before the kill."""
    args = _cmd(tmp_path, "train.steps=3", "run.checkpoint_every=1")[3:]
    script = tmp_path / "die_after_step_1.py"
    script.write_text(
        "import os, sys\n"
        "from resrl import checkpoint\n"
        "save = checkpoint.save\n"
        "def save_then_die(run_dir, step, **kwargs):\n"
        "    path = save(run_dir, step, **kwargs)\n"
        "    if step == 1:\n"
        "        os._exit(137)\n"
        "    return path\n"
        "checkpoint.save = save_then_die\n"
        "from resrl.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    killed = _run([sys.executable, str(script)], tmp_path)
    assert killed.returncode == 137, killed.stderr[-3000:]
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt.name == "step_000001"
    before = checkpoint.load_meta(ckpt)["history"]["rl_seconds"]
    assert before > 0
    resumed = _run(_cmd(tmp_path, "train.steps=3", "run.checkpoint_every=1"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rl_seconds"] > before


def test_unsafe_keys_still_refused():
    saved = resolve("tiny").to_dict()
    with pytest.raises(ConfigError, match="optim.lr"):
        resume_changes(saved, resolve("tiny", overrides=["optim.lr=1e-2"]), "ckpt")


def test_optim_name_never_changes_on_resume():
    """Another optimizer's state does not load into this one's: refused even with force."""
    saved = resolve("tiny").to_dict()
    forced = resolve("tiny", overrides=["optim.name=adamw8bit", "run.resume=force"])
    with pytest.raises(ConfigError, match="optim.name differs .* format of the saved optimizer state"):
        resume_changes(saved, forced, "ckpt")


def test_ctrl_c_during_resrl_eval_is_one_line_and_writes_nothing(tmp_path):
    run = _run(_cmd(tmp_path, "train.steps=1"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = tmp_path / "held.jsonl"
    export = [
        sys.executable,
        "-m",
        "resrl",
        "data",
        "export",
        "--preset",
        "tiny",
        *SMALL,
        f"run.out_dir={tmp_path}",
    ]
    assert _run([*export, "--out", str(data)], tmp_path).returncode == 0
    final = tmp_path / "run" / "final"
    # Thousands of samples per problem: minutes of sampling. The signal comes after the start-up
    # (or, on a slow machine, during it: the same one line either way).
    cmd = [sys.executable, "-m", "resrl", "eval", "--model", str(final), "--data", str(data), "--n", "4096"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the evaluation finished before the signal arrived")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "resrl: stopped by SIGINT" in err
    assert not (tmp_path / "run" / "eval" / "final_summary.json").exists()
