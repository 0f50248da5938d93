"""Prompt datasets: JSONL / JSON-list / Parquet files of verl rows or plain rows, and prompt encoding.

Row kinds (detected per row):

* verl: ``{"prompt": [{"role", "content"}, ...] | str, "data_source": str,
  "reward_model": {"ground_truth": str | number}, ...}`` (verl's RL parquet schema);
* plain: ``{"problem": str, "answer": str | number}``, optionally with a ready-made ``"prompt"``
  (str or message list) that is used instead of ``problem``, and a ``data_source``.

A row's other fields (verl's ``extra_info`` and ``ability``, a plain row's ``problem``, any other
column) are kept in ``Example.extra``, for a reward that takes them as keywords.

Every malformed row raises ``DataError`` naming the file, the 1-based row (the line number for
JSONL) and the field. ``Example.index`` is the row's 0-based position among the file's examples,
not verl's ``extra_info.index``: positions are unique within a file, verl's indices need not be.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resrl.errors import UserError

_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Example:
    """One prompt and the ground truth its responses are verified against."""

    prompt: str | list[dict[str, str]]
    answer: str
    data_source: str = "unknown"
    index: int = 0
    solution: str | None = None
    """A reference response (plain rows' optional ``solution``), used by the supervised warm start."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The row's other fields as read (verl's ``extra_info`` and ``ability``, a plain row's
    ``problem``, any other column), for a reward that takes them as keywords. Left out of ``==``
    and the repr: an example is its prompt and answer, these only travel with it."""

    def reward_fields(self) -> dict[str, Any]:
        """The keywords a reward may take besides the response and ground truth: ``data_source``,
        ``prompt``, ``solution`` (None when the row has none) and the ``extra`` fields."""
        return {
            **self.extra,
            "data_source": self.data_source,
            "prompt": self.prompt,
            "solution": self.solution,
        }


class DataError(UserError, ValueError):
    """A dataset file or row that cannot be used; the message names file, row and field."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset path that names no file."""


def _error(path: Path, row: int, field: str, problem: str) -> DataError:
    return DataError(f"{path}: row {row}: field {field!r}: {problem}")


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, decoded row) pairs; JSONL row numbers are line numbers."""
    if path.suffix == ".jsonl":
        # Read as bytes and decoded line by line: a text-mode file decodes ahead in blocks, so its
        # UnicodeDecodeError would name the line the block started at, not the bad one.
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    # utf-8-sig: a byte-order mark some editors put before the first line.
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _error(
                        path,
                        line_no,
                        "<row>",
                        f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)",
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise _error(
                        path, line_no, "<row>", f"not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of rows, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    elif path.suffix == ".parquet":
        yield from enumerate(_parquet_rows(path), start=1)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; accepted: {', '.join(_SUFFIXES)}")


def _parquet_rows(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        # pyarrow's message runs over several lines and names its own internals; the first line
        # says what is wrong (e.g. "Parquet magic bytes not found in footer").
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from e


def _text(path: Path, row: int, field: str, value: Any, *, numbers: bool = False) -> str:
    """A non-empty string field; ``numbers`` also accepts ints/floats (ground truths in parquet)."""
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "str or number" if numbers else "str"
        raise _error(path, row, field, f"expected a {kind}, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _error(path, row, field, "is empty")
    return value


def _prompt(path: Path, row: int, field: str, value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _text(path, row, field, value)
    if not isinstance(value, list) or not value:
        raise _error(path, row, field, f"expected a str or a non-empty list of messages, got {value!r:.60}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _error(path, row, f"{field}[{i}]", f"expected a message dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise _error(
                    path, row, f"{field}[{i}].{key}", f"expected a str, got {message.get(key)!r:.60}"
                )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


# Row fields that become an Example's own attributes; the rest are carried in Example.extra.
_OWN_FIELDS = ("prompt", "answer", "reward_model", "data_source", "solution")


def _extra(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in _OWN_FIELDS}


def _example(path: Path, row: int, obj: Any, index: int) -> Example:
    if not isinstance(obj, dict):
        raise _error(path, row, "<row>", f"expected an object, got {type(obj).__name__}")
    source = obj.get("data_source", "unknown")
    if source is None:
        source = "unknown"
    source = _text(path, row, "data_source", source)
    if "reward_model" in obj or (isinstance(obj.get("prompt"), list) and "answer" not in obj):
        if "prompt" not in obj:
            raise _error(path, row, "prompt", "missing (verl rows need prompt and reward_model.ground_truth)")
        prompt = _prompt(path, row, "prompt", obj["prompt"])
        reward_model = obj.get("reward_model")
        if not isinstance(reward_model, dict):
            raise _error(
                path, row, "reward_model", f"expected an object with ground_truth, got {reward_model!r:.60}"
            )
        if "ground_truth" not in reward_model:
            raise _error(path, row, "reward_model.ground_truth", "missing")
        answer = _text(path, row, "reward_model.ground_truth", reward_model["ground_truth"], numbers=True)
        return Example(prompt=prompt, answer=answer, data_source=source, index=index, extra=_extra(obj))
    if "problem" not in obj and "answer" not in obj:
        raise _error(
            path,
            row,
            "<row>",
            f"neither a verl row (prompt, reward_model.ground_truth) nor a plain row (problem, answer); "
            f"keys: {sorted(obj)}",
        )
    if "answer" not in obj:
        raise _error(path, row, "answer", "missing")
    answer = _text(path, row, "answer", obj["answer"], numbers=True)
    if obj.get("prompt") is not None:
        prompt = _prompt(path, row, "prompt", obj["prompt"])
    elif "problem" in obj:
        prompt = _text(path, row, "problem", obj["problem"])
    else:
        raise _error(path, row, "problem", "missing")
    solution = obj.get("solution")
    if solution is not None:
        solution = _text(path, row, "solution", solution)
    return Example(
        prompt=prompt, answer=answer, data_source=source, index=index, solution=solution, extra=_extra(obj)
    )


def load_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a ``.jsonl``, ``.json`` (list of rows) or ``.parquet`` file, in file order."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a dataset file; accepted: {', '.join(_SUFFIXES)} files")
    if not path.is_file():
        raise DataFileNotFoundError(f"dataset file not found: {path}")
    try:
        examples = [_example(path, row, obj, index) for index, (row, obj) in enumerate(_rows(path))]
    except PermissionError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def write_examples(examples: list[Example], path: str | os.PathLike) -> Path:
    """Write ``examples`` as plain JSONL rows (``prompt``, ``answer``, ``data_source``, when there
    is one ``solution``, then the ``extra`` fields) that ``load_examples`` reads back as the same
    examples (``index`` is the row position, as on every load). Parent folders are created."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: examples are written as JSON lines; accepted: a .jsonl path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            row: dict[str, Any] = {
                "prompt": example.prompt,
                "answer": example.answer,
                "data_source": example.data_source,
            }
            if example.solution is not None:
                row["solution"] = example.solution
            row.update({key: value for key, value in example.extra.items() if key not in _OWN_FIELDS})
            # A Parquet column may hold values JSON has no type for (dates); they are written as text.
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path


def encode_prompt(example: Example, tokenizer: Any) -> list[int]:
    """Token ids of the prompt, ready for generation.

    Message lists go through the tokenizer's chat template with the generation prompt; a string is
    wrapped as one user message when the tokenizer has a chat template, else encoded bare after
    bos (when the tokenizer has one). The template is rendered to text and then encoded without
    added special tokens, which is what ``apply_chat_template(tokenize=True)`` does, minus its
    version-dependent return type. A message list with a tokenizer that has no chat template, or a
    prompt that encodes to no tokens, raises ``DataError``.
    """
    prompt = example.prompt
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str) and not template:
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = ids if bos is None else [bos, *ids]
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list):
            raise TypeError(
                f"Example.prompt must be a str or a list of messages, got {type(prompt).__name__}"
            )
        if not template:
            raise DataError(
                f"example {example.index} ({example.data_source}) has a message-list prompt but the tokenizer "
                "has no chat_template; use string prompts or a tokenizer with a chat template"
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise DataError(f"example {example.index} ({example.data_source}) encodes to no tokens")
    return ids
