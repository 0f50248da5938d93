"""A run directory is held by one process at a time.

`hold(run_dir)` takes an exclusive `flock` on `<run_dir>/.lock` and writes who holds it (pid, host,
command, start time) into that file. The kernel drops the lock when the holder's process ends, by
`kill -9` too, so a crash never leaves a directory stuck; a second `resrl train` on the same run
directory is refused in one line naming the holder. The lock is per process: a process that already
holds a directory may hold it again (tests build several trainers on one run in one process).
Under torchrun rank 0 holds it for the run (`resrl.trainer`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from resrl.config import RunError

LOCK_FILE = ".lock"
# Open lock files of this process, by resolved run directory: kept open while held.
_HELD: dict[str, int] = {}


def hold(run_dir: str | os.PathLike) -> None:
    """Hold `run_dir` for this process, or raise RunError naming the process that holds it."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    path = Path(key) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(path)
        os.close(fd)
        raise RunError(
            f"run directory {run_dir} is in use by {holder}; wait for it to finish, stop it, or "
            "choose another run.name / run.out_dir"
        ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:300],
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd


def release(run_dir: str | os.PathLike) -> None:
    """Let `run_dir` go (the end of a run); a no-op when this process does not hold it."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


def _describe(path: Path) -> str:
    try:
        r = json.loads(path.read_text())
        return f"process {r['pid']} on {r['host']} since {r['since']} ({r['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
