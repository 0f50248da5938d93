"""math-verify worker process: JSON lines in on stdin, JSON lines out on a private copy of stdout.

Run by ``resrl.rewards.verify`` as a script in a fresh interpreter (never imported by the trainer).
It imports nothing from ``resrl`` so it starts in the time it takes to import sympy. The parent
enforces the time limit by killing this process, which is the only way to stop sympy inside a C
big-integer operation; math-verify's own ``signal.alarm`` timeouts are therefore switched off.

Protocol: the worker prints ``ready`` once imports are done, then for each request line
``{"gold": str, "pred": str}`` answers ``{"ok": bool}``.
"""

import json
import logging
import os
import resource
import sys

# Bounds what one pathological answer can allocate before the parent's timeout kills the worker.
_MEMORY_LIMIT_BYTES = 4 << 30


def _wrap(answer: str) -> str:
    # A box makes math-verify's LaTeX extractor take the whole string as the answer.
    return "\\boxed{" + answer + "}"


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    # Anything a library prints goes to stderr, never into the protocol stream.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = _MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(_MEMORY_LIMIT_BYTES, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError):
        pass
    from math_verify import parse, verify

    verify(
        parse(_wrap("1"), parsing_timeout=None), parse(_wrap("1"), parsing_timeout=None), timeout_seconds=None
    )
    protocol.write("ready\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold = parse(_wrap(request["gold"]), parsing_timeout=None)
            pred = parse(_wrap(request["pred"]), parsing_timeout=None)
            ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
        except Exception:
            ok = False
        protocol.write(json.dumps({"ok": ok}) + "\n")


if __name__ == "__main__":
    main()
