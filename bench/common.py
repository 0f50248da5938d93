"""Timing, memory and results-file helpers shared by the benchmarks; the commit and test outcome
each recorded row names.

    python bench/common.py commit                     # the commit rows are recorded at
    python bench/common.py commit-file                # write .whl/commit.json (make gpu-wheels does)
    python bench/common.py tests-marker X.xml:RC ...  # after a test run: the outcome --record checks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Written by `make gpu-wheels` into the ignored folder the device call carries: the GPU machine's
# copy of the tree has no .git, so the commit travels beside the wheels.
COMMIT_FILE = ROOT / ".whl" / "commit.json"
# The source whose content a tree fingerprint covers.
SOURCE_DIRS = ("kernels", "resrl", "bench", "tests")
TESTS_MARKER = ".tests_green.json"
# pytest exit codes of a run that finished: all passed, some failed, nothing selected.
FINISHED = (0, 1, 5)


def results_dir() -> Path:
    """Where rows are appended: bench/results, or RESRL_RESULTS_DIR (gpu_check's smoke run)."""
    return Path(os.environ.get("RESRL_RESULTS_DIR") or ROOT / "bench" / "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5) -> list[float]:
    """Wall times in ms of `reps` calls after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times: list[float]) -> dict:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "reps": len(times),
    }


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated during `fn` above what was allocated before it."""
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, reps: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) in this process: the compute floor's yardstick."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, warmup=3, reps=reps))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def tree_fingerprint(root: Path = ROOT) -> str:
    """A digest of every .py file under kernels/, resrl/, bench/ and tests/ (paths and contents):
    equal on two machines when they hold the same source, git or not."""
    digest = hashlib.sha256()
    files = sorted(p.relative_to(root).as_posix() for d in SOURCE_DIRS for p in (root / d).rglob("*.py"))
    for rel in files:
        digest.update(rel.encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return digest.hexdigest()[:16]


def _git_head(root: Path) -> str | None:
    """HEAD (12 hex digits, `-dirty` when tracked files differ from it) where `root` is the top of a
    git work tree; None without git or a repository."""
    try:
        top, sha = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        if Path(top).resolve() != root.resolve():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def write_commit_file(root: Path = ROOT) -> dict:
    """`.whl/commit.json`: the commit (with `-dirty`), the tree fingerprint and the time, for a copy
    of the tree that travels without .git. Refuses outside a git work tree."""
    head = _git_head(root)
    if head is None:
        raise SystemExit(f"{root} is not the top of a git work tree: no commit to write")
    record = {"commit": head, "tree": tree_fingerprint(root), "written": _now()}
    path = root / COMMIT_FILE.relative_to(ROOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def git_commit(root: Path = ROOT) -> str:
    """The commit results are recorded at: git's HEAD (`-dirty` with uncommitted changes to tracked
    files). Where the tree has no .git (the GPU machine's copy): RESRL_COMMIT if set, else
    `.whl/commit.json` from `make gpu-wheels`, with `+changed` when the source is no longer the one
    it was written for; else "unknown"."""
    head = _git_head(root)
    if head is not None:
        return head
    if os.environ.get("RESRL_COMMIT"):
        return os.environ["RESRL_COMMIT"]
    path = root / COMMIT_FILE.relative_to(ROOT)
    try:
        record = json.loads(path.read_text())
        return record["commit"] + ("" if record["tree"] == tree_fingerprint(root) else "+changed")
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def environment(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "tree": tree_fingerprint(),
        "date": _now(),
    }


def append_results(filename: str, rows: list[dict]) -> Path:
    """Append `rows` to results_dir()/filename at once (a benchmark calls this per finished case,
    so a run stopped later keeps them)."""
    path = results_dir() / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------- test outcome


def _junit_files(junit: Path) -> dict[str, dict[str, int]]:
    """Per test file (tests/x.py): passed, failed (failures and errors) and skipped cases."""
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(junit).iter("testcase"):
        parts = case.get("classname", "").split(".")
        # classname is tests.test_x or tests.test_x.TestClass: the longest prefix that is a file.
        rel = next((f"{'/'.join(parts[:i])}.py" for i in range(len(parts), 0, -1)
                    if (ROOT / f"{'/'.join(parts[:i])}.py").is_file()), ".".join(parts))  # fmt: skip
        tally = counts.setdefault(rel, {"passed": 0, "failed": 0, "skipped": 0})
        kinds = {child.tag for child in case}
        key = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        tally[key] += 1
    return counts


def write_tests_marker(runs: list[tuple[Path, int]], selection: str = "") -> dict:
    """After a test run (gpu_check's tests stage): per test file its passed/failed/skipped cases,
    merged over the pytest runs `runs` (junit file, exit code), with the tree fingerprint and the
    device the tests ran on. `complete`: every run finished and wrote its junit file (a run stopped
    by its time limit did not). `require_green_tests` reads it, so a later device call (another
    machine maybe) records benchmarks without rerunning the tests when the tree is the same."""
    files: dict[str, dict[str, int]] = {}
    complete = True
    for junit, code in runs:
        if code not in FINISHED or not junit.is_file():
            complete = False
            continue
        for rel, tally in _junit_files(junit).items():
            merged = files.setdefault(rel, {"passed": 0, "failed": 0, "skipped": 0})
            for key, n in tally.items():
                merged[key] += n
    marker = {
        "tree": tree_fingerprint(),
        "commit": git_commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": _now(),
        "selection": selection,
        "complete": complete,
        "files": files,
    }
    path = results_dir() / TESTS_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def read_tests_marker(device_type: str) -> dict | None:
    """The tests marker if it was written for this tree on this kind of device, else None."""
    try:
        marker = json.loads((results_dir() / TESTS_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("tree") != tree_fingerprint() or marker.get("device") != device_type:
        return None
    return marker


def tests_outcome(device_type: str) -> dict | None:
    """What the tests of this tree on this device did (from the marker), for a row to carry."""
    marker = read_tests_marker(device_type)
    if marker is None:
        return None
    total = {k: sum(t[k] for t in marker["files"].values()) for k in ("passed", "failed", "skipped")}
    return {"source": "tests marker", "date": marker["date"], "complete": marker["complete"],
            "selection": marker["selection"], **total}  # fmt: skip


def require_green_tests(test_files: list[str], device_type: str = "cpu") -> dict:
    """Results are recorded only from a green test run of `test_files`. A complete tests marker of
    this tree and device kind (gpu_check's tests stage, maybe in an earlier device call) in which
    each file ran with no failure counts; a marker with a failure refuses; otherwise the files run
    here. Returns the outcome for the rows to carry."""
    marker = read_tests_marker(device_type)
    if marker is not None and marker["complete"]:
        red = [f for f in test_files if marker["files"].get(f, {}).get("failed", 0)]
        if red:
            raise SystemExit(
                f"not recording results: the tests stage of {marker['date']} failed in {', '.join(red)}"
            )
        tallies = [marker["files"].get(f, {}).get("passed", 0) for f in test_files]
        if all(tallies):
            print(f"tests green at this tree on {device_type} ({marker['date']}, {sum(tallies)} passed in "
                  f"{', '.join(test_files)}{'; ' + marker['selection'] if marker['selection'] else ''})")  # fmt: skip
            return {"source": "tests marker", "date": marker["date"], "files": test_files,
                    "selection": marker["selection"], "passed": sum(tallies), "failed": 0}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *test_files,
        ]
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"not recording results: {' '.join(cmd)} failed (exit {proc.returncode})")
        passed = sum(t["passed"] for t in _junit_files(junit).values())
    return {"source": "this run", "date": _now(), "files": test_files, "selection": "", "passed": passed,
            "failed": 0}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("commit", help="print the commit rows are recorded at")
    sub.add_parser("commit-file", help=f"write {COMMIT_FILE.relative_to(ROOT)}")
    marker = sub.add_parser("tests-marker", help=f"write {TESTS_MARKER} in the results folder")
    marker.add_argument("runs", nargs="+", metavar="JUNIT:EXIT", help="junit file and pytest exit code")
    marker.add_argument("--selection", default="", help="the tests selected, if not all (recorded)")
    args = p.parse_args(argv)
    if args.cmd == "commit":
        print(git_commit())
    elif args.cmd == "commit-file":
        record = write_commit_file()
        print(f"{COMMIT_FILE.relative_to(ROOT)}: {record['commit']} tree {record['tree']}")
    else:
        runs = []
        for item in args.runs:
            junit, _, code = item.rpartition(":")
            if not junit or not code.lstrip("-").isdigit():
                p.error(f"tests-marker: {item!r} is not JUNIT:EXIT (a junit file and a pytest exit code)")
            runs.append((Path(junit), int(code)))
        m = write_tests_marker(runs, args.selection)
        total = {k: sum(t[k] for t in m["files"].values()) for k in ("passed", "failed", "skipped")}
        print(f"tests marker ({m['device']}, complete={m['complete']}): {total['passed']} passed, "
              f"{total['failed']} failed, {total['skipped']} skipped in {len(m['files'])} files")  # fmt: skip


if __name__ == "__main__":
    main()
