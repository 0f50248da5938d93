"""Runs that never lie and never lose work: the resume rules (a changed config is refused unless
its keys are safe or run.resume=force), crash recovery (a damaged checkpoint, a torn metrics line,
a kill or a full disk during a save, run.resume=false on an old run), non-finite guards, progress
lines and warnings. Faults that end a process are injected in a subprocess running the CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from small import SMALL_RUN

from resrl import checkpoint
from resrl.config import (
    RESUME_SAFE_KEYS,
    SHAPE_KEYS,
    Config,
    ConfigError,
    RunError,
    resolve,
    resume_changes,
)
from resrl.tracker import read_metrics
from resrl.trainer import Trainer

SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "eval.before=false",
    "run.name=run",
]


def small_args(out, *extra):
    return ["--preset", "tiny", *SMALL, f"run.out_dir={out}", *extra]


def small_cfg(out, *extra):
    return resolve("tiny", overrides=[*SMALL, f"run.out_dir={out}", *extra])


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished two-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("base")
    Trainer(small_cfg(out, "run.checkpoint_every=1")).fit()
    return out / "run"


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the base run to damage or resume: its run directory is tmp_path / "run"."""
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path


def run_cli(tmp_path, inject: str, args: list[str]) -> subprocess.CompletedProcess:
    """`resrl <args>` in a fresh Python process, after running `inject` (fault injection) there."""
    script = tmp_path / "inject.py"
    script.write_text(
        "import sys\n" + textwrap.dedent(inject) + f"\nfrom resrl.cli import main\nsys.exit(main({args!r}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and, warnings aside, one line on stderr: `resrl: error: ...` with every fragment."""
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [
        line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("resrl: warning:")
    ]
    assert len(lines) == 1 and lines[0].startswith("resrl: error: "), proc.stderr[-4000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- resume rules


def test_safe_and_shape_keys_name_config_fields():
    fields = {
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(s.default_factory)
    }
    sections = {s.name for s in dataclasses.fields(Config)}
    for key in (*RESUME_SAFE_KEYS, *SHAPE_KEYS):
        assert key in fields or (key.endswith(".*") and key[:-2] in sections), key


def test_resume_changes_lists_every_unsafe_key():
    saved = resolve("tiny").to_dict()
    safe = resolve("tiny", overrides=["train.steps=500", "eval.n=4", "run.progress=false", "train.pack=true"])
    assert resume_changes(saved, safe, "ckpt") == {}
    changed = resolve("tiny", overrides=["algorithm.objective=grpo", "optim.lr=1e-3", "eval.n=4"])
    with pytest.raises(ConfigError) as info:
        resume_changes(saved, changed, "ckpt")
    message = str(info.value)
    assert "\n" not in message
    assert (
        "config differs from the checkpoint ckpt in algorithm.objective ('resrl' -> 'grpo'), optim.lr ("
        in message
    )
    assert "eval.n (" not in message and "run.resume=force" in message
    forced = resolve("tiny", overrides=["algorithm.objective=grpo", "optim.lr=1e-3", "run.resume=force"])
    got = resume_changes(saved, forced, "ckpt")
    assert got == {"algorithm.objective": ["resrl", "grpo"], "optim.lr": [saved["optim"]["lr"], 1e-3]}
    shape = resolve("tiny", overrides=["model.hidden_size=256", "run.resume=force"])
    with pytest.raises(
        ConfigError, match="model.hidden_size differs .* fixes the shape of the saved weights"
    ):
        resume_changes(saved, shape, "ckpt")
    # A field the checkpoint does not know (added since) is not a difference.
    del saved["rollout"]["gpu_memory_utilization"]
    assert resume_changes(saved, safe, "ckpt") == {}


@pytest.mark.parametrize("value, ok", [("true", True), ("false", False), ("force", "force"), ("maybe", None)])
def test_run_resume_values(value, ok):
    if ok is None:
        with pytest.raises(
            ConfigError, match="run.resume: 'maybe' is not supported; accepted: true, false, force"
        ):
            resolve("tiny", overrides=[f"run.resume={value}"])
    else:
        assert resolve("tiny", overrides=[f"run.resume={value}"]).run.resume == ok


def test_resume_with_a_changed_config_is_refused_in_one_line(run_copy):
    proc = run_cli(
        run_copy, "", ["train", *small_args(run_copy, "algorithm.objective=grpo", "optim.lr=1e-3")]
    )
    assert_one_line_error(
        proc,
        "config differs from the checkpoint",
        "step_000002 in algorithm.objective ('resrl' -> 'grpo'), optim.lr (",
        "run.resume=force",
    )
    # Nothing was touched.
    assert json.loads((run_copy / "run" / "config.json").read_text())["algorithm"]["objective"] == "resrl"


def test_safe_keys_change_on_resume(run_copy):
    trainer = Trainer(
        small_cfg(run_copy, "train.steps=3", "eval.n=3", "run.checkpoint_every=2", "train.micro_batch_size=2")
    )
    assert trainer.step == 2
    config = json.loads((run_copy / "run" / "config.json").read_text())
    assert config["eval"]["n"] == 3 and config["train"]["micro_batch_size"] == 2
    assert not (run_copy / "run" / "config_changes.jsonl").exists()
    with pytest.raises(ConfigError, match="train.steps=1 is below step 2 of the checkpoint"):
        Trainer(small_cfg(run_copy, "train.steps=1"))


def test_force_continues_with_the_new_config_and_records_it(run_copy, capsys):
    run = run_copy / "run"
    old_lr = json.loads((run / "config.json").read_text())["optim"]["lr"]
    trainer = Trainer(
        small_cfg(
            run_copy,
            "train.steps=3",
            "algorithm.objective=grpo",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            "run.resume=force",
        )
    )
    assert trainer.step == 2
    # The optimizer runs with the new lr (the checkpoint restored the old one).
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3]
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["lr"] == 1e-3 and config["algorithm"]["objective"] == "grpo"
    (record,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["checkpoint"].endswith("step_000002")
    assert record["changed"] == {
        "algorithm.objective": ["resrl", "grpo"],
        "optim.lr": [old_lr, 1e-3],
        "optim.warmup_steps": [5, 0],
    }
    assert (
        "run.resume=force: continuing with algorithm.objective 'resrl' -> 'grpo'" in capsys.readouterr().err
    )
    trainer.fit()
    assert read_metrics(run)[-1]["optim/lr"] == 1e-3
    assert checkpoint.load_meta(checkpoint.latest(run))["history"]["config_changes"] == [record]


# ---------------------------------------------------------------------------- crash recovery


@pytest.mark.parametrize("damaged", ["shards/__0_0.distcp", "shards/.metadata", "meta.json"])
def test_truncated_latest_checkpoint_resumes_from_the_previous(run_copy, base_run, capsys, damaged):
    ckpts = run_copy / "run" / "checkpoints"
    path = ckpts / "step_000002" / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    trainer = Trainer(small_cfg(run_copy))
    assert trainer.step == 1
    err = capsys.readouterr().err
    assert f"resrl: warning: checkpoint {ckpts / 'step_000002'} is damaged (" in err
    assert damaged.split("/")[-1] in err and f"resuming from step 1 ({ckpts / 'step_000001'})" in err
    assert (ckpts / "damaged_step_000002").is_dir() and not (ckpts / "step_000002").exists()
    trainer.fit()
    # Step 2 redone from step 1's checkpoint is the step the base run took.
    redone, straight = read_metrics(run_copy / "run")[1], read_metrics(base_run)[1]
    assert _comparable(redone) == pytest.approx(_comparable(straight), rel=1e-6, abs=1e-7)


def test_truncated_shard_through_the_cli(run_copy, base_run):
    """The same through `resrl train` in its own process: a warning, the resume line, exit 0."""
    ckpts = run_copy / "run" / "checkpoints"
    shard = ckpts / "step_000002" / "shards" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = run_cli(run_copy, "", ["train", *small_args(run_copy)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        f"resrl: warning: checkpoint {ckpts / 'step_000002'} is damaged (shards/__0_0.distcp has 1000 bytes"
        in proc.stderr
    )
    assert f"resuming from step 1 ({ckpts / 'step_000001'})" in proc.stderr
    redone, straight = read_metrics(run_copy / "run")[1], read_metrics(base_run)[1]
    assert _comparable(redone) == pytest.approx(_comparable(straight), rel=1e-6, abs=1e-7)


def test_no_intact_checkpoint_is_an_error(run_copy):
    for step in (1, 2):
        (run_copy / "run" / "checkpoints" / f"step_00000{step}" / "meta.json").write_bytes(b"PK\x03")
    with pytest.raises(RunError, match="no intact checkpoint in .*checkpoints to resume from"):
        Trainer(small_cfg(run_copy))


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    """A process killed while writing a metrics row leaves half a line; the resume drops it."""
    inject = """
    import os, signal
    from resrl import tracker
    log = tracker.Tracker.log
    def torn(self, step, metrics):
        if step == 2:
            self._file.write('{"step": 2, "reward/me')
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        log(self, step, metrics)
    tracker.Tracker.log = torn
    """
    proc = run_cli(tmp_path, inject, ["train", *small_args(tmp_path, "run.checkpoint_every=1")])
    assert proc.returncode == -9, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").read_text().endswith('"reward/me')
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert f"resrl: warning: {run / 'metrics.jsonl'}: dropped its torn last line" in capsys.readouterr().err
    Trainer(small_cfg(tmp_path)).fit()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, capsys):
    inject = """
    import os, signal
    from resrl import checkpoint
    save = checkpoint.dcp.save
    def killed(state, checkpoint_id, **kwargs):
        save(state, checkpoint_id=checkpoint_id, **kwargs)
        if "step_000002" in str(checkpoint_id):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.dcp.save = killed
    """
    proc = run_cli(tmp_path, inject, ["train", *small_args(tmp_path, "run.checkpoint_every=1")])
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / ".step_000002.tmp").is_dir() and not (ckpts / "step_000002").exists()
    trainer = Trainer(small_cfg(tmp_path))
    assert trainer.step == 1
    assert f"resuming from step 1 ({ckpts / 'step_000001'})" in capsys.readouterr().err
    trainer.fit()
    assert checkpoint.latest(tmp_path / "run") == ckpts / "step_000002"
    assert not list(ckpts.glob(".*tmp"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """ENOSPC raised inside torch.distributed.checkpoint's writer on the second save."""
    inject = """
    import errno, os
    from resrl import checkpoint
    save, fsync = checkpoint.dcp.save, os.fsync
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    def second_save_fails(state, checkpoint_id, **kwargs):
        if "step_000002" in str(checkpoint_id):
            os.fsync = full
        try:
            return save(state, checkpoint_id=checkpoint_id, **kwargs)
        finally:
            os.fsync = fsync
    checkpoint.dcp.save = second_save_fails
    """
    proc = run_cli(tmp_path, inject, ["train", *small_args(tmp_path, "run.checkpoint_every=1")])
    ckpts = tmp_path / "run" / "checkpoints"
    line = assert_one_line_error(
        proc,
        f"cannot write the checkpoint of step 2 to {ckpts / '.step_000002.tmp'}: No space left on device (",
        f"free there); the partial folder was removed and the previous checkpoint ({ckpts / 'step_000001'}) is intact",
    )
    assert any(unit in line for unit in ("bytes free", "KiB free", "MiB free", "GiB free"))
    assert not list(ckpts.glob(".*tmp"))
    assert checkpoint.latest(tmp_path / "run") == ckpts / "step_000001"
    assert checkpoint.damage(ckpts / "step_000001") is None
    assert Trainer(small_cfg(tmp_path)).step == 1


def test_resume_false_sets_the_previous_run_aside(run_copy, capsys):
    run = run_copy / "run"
    trainer = Trainer(small_cfg(run_copy, "train.steps=1", "run.checkpoint_every=1", "run.resume=false"))
    assert trainer.step == 0
    (aside,) = run.glob("replaced-*")
    assert f"run.resume=false: the previous run in {run} was moved to {aside}" in capsys.readouterr().err
    trainer.fit()
    # The new run's checkpoints only (its warm start's last, then step 1); the old run's are whole,
    # beside it.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000", "step_000001"]
    assert sorted(p.name for p in (aside / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    assert [r["step"] for r in read_metrics(aside)] == [1, 2]
    assert [r["step"] for r in read_metrics(run)] == [1]


# ---------------------------------------------------------------------------- non-finite and pointless


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("algorithm.eps_high=.inf", "algorithm.eps_high"),
        ("algorithm.dual_clip=1e999", "algorithm.dual_clip"),
        ("eval.temperature=-inf", "eval.temperature"),
        ("sft.lr=NaN", "sft.lr"),
        ("optim.lr=1e39", "optim.lr"),
    ],
)
def test_non_finite_config_values_are_refused(override, key):
    with pytest.raises(
        ConfigError,
        match=rf"config {key}: must be a finite number within float32's range \(\|x\| <= 3.4e38\), got",
    ):
        resolve("tiny", overrides=[override])


def test_non_finite_value_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="config optim.lr: must be a finite number .*, got inf"):
        resolve("tiny", path)


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["algorithm.objective=grpo"], True),
        (["algorithm.objective=resrl", "algorithm.advantage=drgrpo"], True),
        (["algorithm.objective=ace"], True),
        (["algorithm.objective=grpo", "algorithm.advantage=reinforce"], False),
        (["algorithm.objective=psr"], False),
        (["algorithm.objective=nsr"], False),
        (["algorithm.objective=w_reinforce"], False),
    ],
)
def test_one_response_per_group_with_a_group_baseline_is_refused(extra, refused):
    args = ["rollout.n=1", *extra]
    if refused:
        with pytest.raises(
            ConfigError, match="config rollout.n: 1 response per prompt .* relative to the group"
        ):
            resolve("tiny", overrides=args)
    else:
        assert resolve("tiny", overrides=args).rollout.n == 1


def test_parameters_that_become_non_finite_stop_the_run_in_one_line(tmp_path):
    """An optimizer step that overflows a weight (injected: AdamW's step, then inf in one weight)."""
    inject = """
    import torch
    step = torch.optim.AdamW.step
    def overflowing(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return out
    torch.optim.AdamW.step = overflowing
    """
    proc = run_cli(
        tmp_path, inject, ["train", *small_args(tmp_path, "sft.steps=0", "run.checkpoint_every=1")]
    )
    assert_one_line_error(
        proc,
        "training stopped in the update phase at step 1: the parameters are not finite after the optimizer "
        "step (first: model.",
    )
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_non_finite_gradient_stops_before_a_checkpoint_is_written(run_copy):
    trainer = Trainer(small_cfg(run_copy, "train.steps=3", "run.checkpoint_every=1"))
    update = trainer.update

    def poisoned(batch, seq_adv, step, plan, **kw):
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))
        return update(batch, seq_adv, step, plan, **kw)

    trainer.update = poisoned
    # The kernels' value check sees the NaN weight first (the gradient norm without RESRL_KERNEL_CHECKS).
    stopped = r"training stopped in the update phase at step 3: (hidden contains NaN or Inf|the gradient norm is nan)"
    with pytest.raises(RunError, match=stopped):
        trainer.fit()
    run = run_copy / "run"
    assert checkpoint.latest(run).name == "step_000002"
    assert Trainer(small_cfg(run_copy, "train.steps=3")).step == 2


def test_warm_start_that_diverges_stops_in_one_line(tmp_path):
    """sft.lr 1e30 is finite; after one step the weights are ~1e30 and the next step's numbers are not."""
    trainer = Trainer(small_cfg(tmp_path, "sft.lr=1e30"))
    with pytest.raises(
        RunError, match="the warm start stopped at step 2 of 3: .*(NaN or Inf|nan).*lower sft.lr"
    ):
        trainer.warm_start()


# ---------------------------------------------------------------------------- progress and noise


def test_progress_shows_phases_resume_and_which_evaluation(run_copy, capsys):
    Trainer(small_cfg(run_copy, "train.steps=4", "eval.every=1", "run.progress=true")).fit()
    err = capsys.readouterr().err
    ckpts = run_copy / "run" / "checkpoints"
    assert f"resuming from step 2 ({ckpts / 'step_000002'})" in err
    for phase in ("rollout", "pre-pass", "update", "sync", "eval"):
        assert f"resrl {phase}" in err, phase
    assert "evaluation at step 3: 2/2 problems" in err and "evaluation after RL: 2/2 problems" in err
    assert "\neval: " not in err


def test_fresh_run_says_before_and_warns_nothing(tmp_path, capsys, recwarn):
    cfg = small_cfg(
        tmp_path, "train.steps=1", "eval.before=true", "run.checkpoint_every=1", "run.progress=true"
    )
    Trainer(cfg).fit()
    assert "evaluation before RL: 2/2 problems" in capsys.readouterr().err
    noisy = [
        str(w.message)
        for w in recwarn
        if "requires_grad=True to a scalar" in str(w.message)
        or "torch.distributed is disabled" in str(w.message)
    ]
    assert noisy == []
