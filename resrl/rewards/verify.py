"""Answer verification: an exact fast path for plain numbers, math-verify in a killable worker otherwise.

Two departures from calling ``math_verify.verify`` in-process, both for robustness at RL scale:

* Plain integers, decimals and simple fractions (``-12``, ``0.5``, ``3/4``, ``\\frac{3}{4}``) are
  compared as exact rationals without sympy: microseconds per call, and the trainer verifies
  thousands of short answers per step. Equal values verify; unequal exact values (integers,
  fractions) fail. When a decimal is involved and the values differ, math-verify decides, so its
  6-digit rounding rule (``0.333333`` == ``1/3``) is kept.
* math-verify's own timeout is ``signal.alarm``: it works only on the main thread, has whole-second
  resolution, and cannot interrupt a C-level big-integer power (``9^{9^{9^{9^9}}}`` hangs it). Here
  it runs in persistent worker processes (fresh interpreters that import only math-verify) and a
  call that overruns ``timeout_s`` kills its worker and returns False. This works from any thread;
  concurrent callers each get their own worker. POSIX only (``selectors`` on a pipe).

A training step verifies hundreds of responses; ``verify_batch`` does them together: identical
(answer, ground truth) pairs are verified once, and the pairs that need math-verify run in a
bounded pool of worker processes, so a step whose answers time out costs about
(answers that time out / workers) x ``timeout_s`` instead of their sum.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from resrl.rewards.extract import _unwrap_boxed, clean_answer, extract_answer

# Longer "answers" are rambling, not a final answer; refusing them keeps IPC and parsing bounded.
MAX_ANSWER_CHARS = 1000
# Numbers longer than this go to math-verify (int() refuses > 4300 digits anyway).
_MAX_FAST_CHARS = 64
_STARTUP_TIMEOUT_S = 120.0
# Math-verify processes a batch runs at once. More than the cores still helps: a pathological
# answer mostly waits out its time limit, and worker start-ups overlap.
DEFAULT_WORKERS = min(8, max(4, os.cpu_count() or 1))
# Idle workers kept between calls (each holds sympy, ~100 MB): a batch's pool stays warm.
_MAX_IDLE_WORKERS = DEFAULT_WORKERS
_WORKER_FILE = Path(__file__).with_name("_mv_worker.py")
# Runs the worker by path without putting its folder on sys.path (no shadowing of stdlib names).
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"

_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH_FRAC_RE = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_TEX_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}")


def _as_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, is_decimal) for a plain integer / decimal / simple fraction, else None."""
    text = text.strip()
    if not text or len(text) > _MAX_FAST_CHARS:
        return None
    if _DECIMAL_RE.fullmatch(text):
        return Fraction(text), "." in text
    m = _SLASH_FRAC_RE.fullmatch(text)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2))), False
    m = _TEX_FRAC_RE.fullmatch(text)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return (-value if m.group(1) == "-" else value), False
    return None


@functools.lru_cache(maxsize=65536)
def _gold_answer(ground_truth: str) -> str:
    """A ground truth may be a bare answer or itself contain ``\\boxed{}`` / ``$..$``."""
    boxed = extract_answer(ground_truth) if "\\boxed" in ground_truth else None
    return boxed if boxed is not None else clean_answer(_unwrap_boxed(ground_truth))


def _check_timeout(timeout_s: float) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")


def _prepare(response: str, ground_truth: str) -> bool | tuple[str, str]:
    """The verdict when it is decided without math-verify, else the (gold, pred) pair to send."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    gold = _gold_answer(ground_truth)
    if not gold:
        raise ValueError(f"ground_truth {ground_truth!r} holds no answer")
    pred = extract_answer(response)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return False
    if pred == gold:
        return True
    pred_num, gold_num = _as_number(pred), _as_number(gold)
    if pred_num is not None and gold_num is not None:
        if pred_num[0] == gold_num[0]:
            return True
        if not (pred_num[1] or gold_num[1]):
            return False
    return gold, pred


def verify_answer(response: str, ground_truth: str, *, timeout_s: float = 2.0) -> bool:
    """True iff the final answer of ``response`` (see ``extract_answer``) equals ``ground_truth``.

    Never raises on model output and never blocks for much longer than ``timeout_s``: malformed,
    missing, overlong (> MAX_ANSWER_CHARS) or too-slow answers are simply wrong. The first call that
    needs math-verify starts a worker process; that start-up is not charged to ``timeout_s``.
    """
    _check_timeout(timeout_s)
    prepared = _prepare(response, ground_truth)
    if isinstance(prepared, bool):
        return prepared
    return bool(_POOL.verify(*prepared, timeout_s))


@dataclass
class BatchVerdicts:
    """What ``verify_batch`` found, and how much math-verify work it took."""

    verdicts: list[bool]
    """One per response, in order (the same as ``verify_answer`` gives)."""
    checked: int
    """Distinct (gold, answer) pairs that went to math-verify."""
    reused: int
    """Responses answered by an identical pair's verdict from the same batch instead."""
    timed_out: int
    """Checked pairs that overran ``timeout_s`` (counted wrong)."""


def verify_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    timeout_s: float = 2.0,
    workers: int = DEFAULT_WORKERS,
) -> BatchVerdicts:
    """``verify_answer`` for many (response, ground truth) pairs at once, e.g. one training step.

    Each distinct (ground truth, extracted answer) pair that needs math-verify is checked once;
    the others reuse its verdict. Those checks run on up to ``workers`` threads, each with its
    own worker process, so at most ``workers`` answers are being verified (or timing out) at a
    time. ``workers=1`` checks them one after another. Verdicts never depend on ``workers``.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    _check_timeout(timeout_s)
    verdicts: list[bool] = [False] * len(responses)
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (response, truth) in enumerate(zip(responses, ground_truths, strict=True)):
        prepared = _prepare(response, truth)
        if isinstance(prepared, bool):
            verdicts[i] = prepared
        else:
            pending.setdefault(prepared, []).append(i)
    pairs = list(pending)
    if len(pairs) <= 1 or workers == 1:
        found = [_POOL.verify(gold, pred, timeout_s) for gold, pred in pairs]
    else:
        with ThreadPoolExecutor(min(workers, len(pairs)), thread_name_prefix="resrl-verify") as pool:
            found = list(pool.map(lambda pair: _POOL.verify(*pair, timeout_s), pairs))
    for pair, verdict in zip(pairs, found, strict=True):
        for i in pending[pair]:
            verdicts[i] = bool(verdict)
    return BatchVerdicts(
        verdicts=verdicts,
        checked=len(pairs),
        reused=sum(len(rows) - 1 for rows in pending.values()),
        timed_out=sum(verdict is None for verdict in found),
    )


class _Worker:
    """One math-verify process and the pipe protocol to it (used by one thread at a time)."""

    def __init__(self) -> None:
        if not sys.executable:
            raise RuntimeError("verify_answer needs sys.executable to start its math-verify worker")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_WORKER_FILE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        try:
            line = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        except EOFError:
            line = None
        if line != b"ready":
            code = self.kill()
            raise RuntimeError(
                f"the math-verify worker ({_WORKER_FILE}) did not start (exit code {code}); "
                "is the math-verify package installed in this interpreter?"
            )

    def _read_line(self, deadline: float) -> bytes | None:
        """Next protocol line, or None when ``deadline`` passes first; EOFError if the worker died."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker closed its output")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None if it overran ``timeout_s`` (then it must be killed).

        Raises EOFError/OSError if the worker is dead.
        """
        self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else bool(json.loads(line)["ok"])

    def kill(self) -> int | None:
        self._selector.close()
        self.proc.kill()
        code = self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return code


class _WorkerPool:
    """Idle workers shared by all threads; a worker that overruns is killed, never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()

    def _acquire(self) -> _Worker:
        with self._lock:
            if os.getpid() != self._pid:
                # A forked child must not share its parent's pipes; it starts its own workers.
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            if os.getpid() == self._pid and len(self._idle) < _MAX_IDLE_WORKERS:
                self._idle.append(worker)
                return
        worker.kill()

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """The verdict, or None when the answer overran ``timeout_s`` (wrong, like a crash)."""
        # A worker found dead (killed from outside, crashed on the previous input) is replaced once.
        for attempt in range(2):
            worker = self._acquire()
            try:
                verdict = worker.request(gold, pred, timeout_s)
            except (OSError, EOFError, ValueError):
                worker.kill()
                if attempt == 0:
                    continue
                return False
            if verdict is None:
                worker.kill()
                return None
            self._release(worker)
            return verdict
        return False

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            mine = os.getpid() == self._pid
        if mine:
            for worker in idle:
                worker.kill()


_POOL = _WorkerPool()
atexit.register(_POOL.shutdown)


def shutdown_verifier() -> None:
    """Stop the idle math-verify workers now (they also stop at interpreter exit)."""
    _POOL.shutdown()
