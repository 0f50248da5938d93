"""bench/gpu_check.sh's plumbing on the CPU (`--cpu-smoke`: the same script at tiny sizes), and the
pieces it leans on: the commit a tree without .git reports, the tests marker `--record` checks,
and bench_step's rows for a path stopped at its time limit or skipped for host memory."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_step, common  # noqa: E402

STAGE_LOGS = ("tests_gpu", "tests_suite", "kernels", "step_small", "step_offload")
OLD_ROW = {"bench": "step", "commit": "old", "status": "ok"}


@pytest.mark.slow
def test_cpu_smoke_all_writes_one_archive_with_this_runs_rows(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    # A row from an earlier run: the results file keeps it, the archive does not take it.
    (results / "step.jsonl").write_text(json.dumps(OLD_ROW) + "\n")
    repo_rows = {p.name: p.stat().st_size for p in (ROOT / "bench" / "results").glob("*.jsonl")}
    env = {**os.environ, "OUT": str(out), "RESRL_RESULTS_DIR": str(results), "RESRL_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "all"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.name for p in files} == {"gpu_check.tar.gz", "summary.txt"}, files
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> str:
            return tar.extractfile(members[f"gpu_check/{name}"]).read().decode()

        for stage in STAGE_LOGS:
            assert f"gpu_check/logs/{stage}.log" in members, sorted(members)
        assert {"versions.txt", "summary.txt", "tests_marker.json"} <= {Path(n).name for n in members}
        kernel_rows = [json.loads(line) for line in read("results/linear_logprob.jsonl").splitlines()]
        step_rows = [json.loads(line) for line in read("results/step.jsonl").splitlines()]
        kernels_log = read("logs/kernels.log")
    commit = common.git_commit()
    assert kernel_rows and all(r["commit"] == commit != "unknown" for r in kernel_rows + step_rows)
    assert [(r["path"], r["offload"], r["status"]) for r in step_rows] == [
        ("resrl", False, "ok"), ("reference", False, "ok"), ("resrl", True, "ok")
    ]  # fmt: skip
    assert (
        OLD_ROW not in step_rows
        and json.loads((results / "step.jsonl").read_text().splitlines()[0]) == OLD_ROW
    )
    # Recorded after green tests: the tests stage's marker (or, where a file changed between the two
    # stages, the kernels stage's own run of the kernel tests; the marker has its own test below).
    sources = {r["tests"]["source"] for r in kernel_rows}
    assert sources <= {"tests marker", "this run"} and all(r["tests"]["failed"] == 0 for r in kernel_rows)
    assert "tests green at this tree on cpu" in kernels_log or sources == {"this run"}
    summary = (out / "summary.txt").read_text()
    for stage in ("tests", "kernels", "step"):
        assert f"-- stage {stage}" in summary
    assert "STOPPED" not in summary and "FAILED" not in summary
    # Nothing went to the repository's results files.
    assert {p.name: p.stat().st_size for p in (ROOT / "bench" / "results").glob("*.jsonl")} == repo_rows


def test_unknown_stage_is_a_usage_error(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "bench"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 2 and "accepted: tests, kernels, step, all" in proc.stderr
    assert not any(tmp_path.iterdir())


def _tree(root: Path) -> None:
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "k.py").write_text("x = 1\n")


def test_a_tree_without_git_reports_the_commit_file_and_whether_it_changed(tmp_path, monkeypatch):
    monkeypatch.delenv("RESRL_COMMIT", raising=False)
    _tree(tmp_path)
    assert common.git_commit(tmp_path) == "unknown"
    (tmp_path / ".whl").mkdir()
    record = {"commit": "0123456789ab-dirty", "tree": common.tree_fingerprint(tmp_path), "written": "now"}
    (tmp_path / ".whl" / "commit.json").write_text(json.dumps(record))
    assert common.git_commit(tmp_path) == "0123456789ab-dirty"
    (tmp_path / "kernels" / "k.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == "0123456789ab-dirty+changed"
    monkeypatch.setenv("RESRL_COMMIT", "feedface")
    assert common.git_commit(tmp_path) == "feedface"
    with pytest.raises(SystemExit, match="not the top of a git work tree"):
        common.write_commit_file(tmp_path)


def _junit(path: Path, cases: dict[str, str]) -> Path:
    body = "".join(
        f'<testcase classname="tests.{name.split("::")[0]}" name="{name}">'
        + {"passed": "", "failed": "<failure/>", "skipped": "<skipped/>"}[kind]
        + "</testcase>"
        for name, kind in cases.items()
    )
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_the_tests_marker_lets_record_skip_a_rerun_and_refuses_after_red(tmp_path, monkeypatch):
    monkeypatch.setenv("RESRL_RESULTS_DIR", str(tmp_path))
    reruns, real_run = [], subprocess.run

    def run(cmd, **kwargs):  # the kernel tests a marker does not cover "run" here, and fail
        if "pytest" not in cmd:
            return real_run(cmd, **kwargs)
        reruns.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(common.subprocess, "run", run)
    green = _junit(
        tmp_path / "a.xml", {"test_linear_logprob::a": "passed", "test_linear_logprob::b": "skipped"}
    )
    red = _junit(tmp_path / "b.xml", {"test_linear_logprob::c": "failed", "test_fused_loss::d": "passed"})
    files = ["tests/test_linear_logprob.py"]

    common.write_tests_marker([(green, 0)])
    outcome = common.require_green_tests(files, "cpu")
    assert outcome["source"] == "tests marker" and outcome["passed"] == 1 and not reruns
    # Another kind of device, or a run stopped before its junit file: the tests run again (here: red).
    with pytest.raises(SystemExit, match="failed"):
        common.require_green_tests(files, "cuda")
    common.write_tests_marker([(green, 0), (tmp_path / "missing.xml", 124)])
    with pytest.raises(SystemExit, match="failed"):
        common.require_green_tests(files, "cpu")
    assert len(reruns) == 2
    # A failure in a required file refuses without a rerun; one elsewhere does not concern it.
    common.write_tests_marker([(green, 0), (red, 1)])
    with pytest.raises(SystemExit, match="failed in tests/test_linear_logprob.py"):
        common.require_green_tests(files, "cpu")
    assert common.require_green_tests(["tests/test_fused_loss.py"], "cpu")["passed"] == 1
    assert len(reruns) == 2


TINY = ["--model", "tiny", "--device", "cpu", "--prompts", "2", "--n", "2", "--prompt-len", "8",
        "--response-len", "16", "--micro-batch-tokens", "64", "--steps", "1", "--record"]  # fmt: skip


def test_a_path_past_its_time_limit_is_a_row_appended_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RESRL_RESULTS_DIR", str(tmp_path))
    (row,) = bench_step.main([*TINY, "--paths", "resrl", "--path-timeout", "0.5"])
    assert row["status"] == "timeout (0.5 s)" and row["path"] == "resrl"
    recorded = [json.loads(line) for line in (tmp_path / "step.jsonl").read_text().splitlines()]
    assert recorded == [row] and row["commit"]


def test_a_step_that_cannot_fit_host_memory_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("RESRL_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(bench_step, "host_available_bytes", lambda: 2**30)
    rows = bench_step.main([*TINY, "--paths", "resrl,reference", "--offload"])
    assert [r["status"].split(":")[0] for r in rows] == ["skipped", "skipped"]
    assert "needs ~6 GiB host memory, 1 available" in rows[0]["status"]
    # Qwen3-8B with offload needs its 16 bytes per parameter on the host: more than 128 GiB.
    assert bench_step.host_need_bytes("qwen3-8b", offload=True) > 128 * 2**30
    assert bench_step.host_need_bytes("qwen3-4b", offload=True) < 80 * 2**30
