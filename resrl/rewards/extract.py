"""Final-answer extraction: the last complete ``\\boxed{...}``, else the last ``Answer:`` line.

Everything here is a single linear pass over the text (no regex backtracking, no per-match rescans),
so a 100k-character response costs well under a millisecond.
"""

from __future__ import annotations

import re
from collections import deque

# `\boxed{`, `\boxed {` and `\fbox{`; the brace is captured so its position can be looked up.
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)")
_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
# Math delimiters that may wrap an answer on an `Answer:` line.
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced ``{`` to the index of its ``}``; escaped ``\\{ \\}`` are skipped."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for i, ch in enumerate(text):
        if ch != "{" and ch != "}":
            continue
        if i > 0 and text[i - 1] == "\\":
            continue
        if ch == "{":
            stack.append(i)
        elif stack:
            match[stack.pop()] = i
    return match


def _last_boxed(text: str) -> str | None:
    """Content of the last *complete* ``\\boxed{...}``; an unclosed (truncated) one is ignored."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    starts = [m.start(1) for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    match = _matching_braces(text)
    for brace in reversed(starts):
        end = match.get(brace)
        if end is not None:
            return text[brace + 1 : end]
    return None


def _unwrap_boxed(answer: str) -> str:
    """``\\boxed{\\boxed{3}}`` -> ``3``: strip boxes that wrap the whole answer."""
    while True:
        stripped = answer.strip()
        m = _BOXED_RE.match(stripped)
        if m is None:
            return stripped
        brace = m.start(1)
        end = _matching_braces(stripped).get(brace)
        if end != len(stripped) - 1:
            return stripped
        answer = stripped[brace + 1 : end]


def clean_answer(answer: str) -> str:
    """Strip what surrounds an answer but is not part of it: whitespace, markdown bold, ``$..$``,
    ``\\(..\\)``, and trailing periods ("Answer: 9." -> "9")."""
    prev = None
    while prev != answer:
        prev = answer
        answer = answer.strip().strip("*").strip()
        while answer.endswith("."):
            answer = answer[:-1].rstrip()
        for left, right in _WRAPPERS:
            if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : len(answer) - len(right)]
                break
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it states none.

    Priority: the last complete ``\\boxed{...}`` anywhere in the text (nested braces allowed,
    nested boxes unwrapped); otherwise the rest of the line after the last ``Answer:`` (case-
    insensitive, so "Final answer:" works too). An ``Answer:`` with nothing after it gives None.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        answer = clean_answer(_unwrap_boxed(boxed))
        return answer or None
    tail = deque(_ANSWER_RE.finditer(text), maxlen=1)
    if not tail:
        return None
    last = tail[0]
    line_end = text.find("\n", last.end())
    rest = text[last.end() :] if line_end < 0 else text[last.end() : line_end]
    answer = clean_answer(rest)
    return answer or None
