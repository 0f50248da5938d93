"""The embedded default task: short multi-step integer arithmetic with worked steps.

A problem is an expression such as ``(3+4)*2-5``; the policy sees ``format_prompt(problem)`` and
should answer with one line per operation, in evaluation order, then the final answer::

    Q: (3+4)*2-5        <- prompt
    3+4=7
    7*2=14
    14-5=9
    Answer: 9

Expressions are random binary trees over ``+ - *`` with operands in [1, max_operand], printed with
the fewest parentheses that keep the tree's left-to-right evaluation order (a right operand of equal
precedence is always parenthesized, so the steps follow the text). A problem is rejected and redrawn
when any intermediate value exceeds ``max_value`` in magnitude: that keeps solutions short enough for
a character-level model and the arithmetic learnable. Everything is drawn from one
``random.Random(seed)`` stream, so a seed fixes the list and a shorter list is a prefix of a longer one.

Held-out sets: two seeds can draw the same expression by chance; pass the training problems as
``exclude`` (or use ``generate_splits``) for disjoint sets.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DATA_SOURCE = "arithmetic"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Every character the task produces, plus lowercase letters and a little punctuation so short
# English text still encodes: 4 specials + 51 characters = 55 tokens.
CHARS = "0123456789 \n+-*/()=:.,?" + "abcdefghijklmnopqrstuvwxyz" + "AQ"
# Renders messages as their bare contents after BOS, so a verl-style message prompt and a plain
# string prompt give the same tokens (a char model has no use for role markup).
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_OPS = ("+", "-", "*")
_MAX_ATTEMPTS_PER_PROBLEM = 1000

# A node is an operand (int) or (op, left, right).
_Node = int | tuple[str, "_Node", "_Node"]


def format_prompt(problem: str) -> str:
    """The exact text the policy sees before its answer."""
    if not isinstance(problem, str) or not problem:
        raise ValueError(f"problem must be a non-empty str, got {problem!r}")
    return f"Q: {problem}\n"


def _random_tree(rng: random.Random, n_ops: int, max_operand: int) -> _Node:
    if n_ops == 0:
        return rng.randint(1, max_operand)
    n_left = rng.randint(0, n_ops - 1)
    op = rng.choice(_OPS)
    return (op, _random_tree(rng, n_left, max_operand), _random_tree(rng, n_ops - 1 - n_left, max_operand))


def _render(node: _Node) -> str:
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    text_l, text_r = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        text_l = f"({text_l})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        text_r = f"({text_r})"
    return f"{text_l}{op}{text_r}"


def _solve(node: _Node, steps: list[str]) -> int:
    """Value of ``node``; appends one "a op b=c" line per operation in post-order."""
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _solve(left, steps), _solve(right, steps)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    shown_b = f"({b})" if b < 0 else str(b)
    steps.append(f"{a}{op}{shown_b}={value}")
    return value


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def generate_problems(
    n: int,
    seed: int,
    *,
    min_ops: int = 2,
    max_ops: int = 3,
    max_operand: int = 9,
    max_value: int = 99,
    exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` distinct problems ``{"problem", "answer", "solution"}``, deterministic per ``seed``.

    ``min_ops``/``max_ops`` bound the number of operations (uniform in between), ``max_operand`` the
    operands, ``max_value`` every intermediate and final |value|. Problems whose text is in
    ``exclude`` are skipped (for held-out sets disjoint from a training set).
    """
    _check_int("n", n, 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_int("min_ops", min_ops, 1)
    _check_int("max_ops", max_ops, min_ops)
    _check_int("max_operand", max_operand, 1)
    _check_int("max_value", max_value, max_operand)
    excluded = set(exclude)
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[dict] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_PROBLEM * (n + 10):
            raise ValueError(
                f"only {len(problems)} distinct problems of the {n} asked for fit min_ops={min_ops}, "
                f"max_ops={max_ops}, max_operand={max_operand}, max_value={max_value} (minus exclude); "
                "ask for fewer or widen the knobs"
            )
        tree = _random_tree(rng, rng.randint(min_ops, max_ops), max_operand)
        steps: list[str] = []
        answer = _solve(tree, steps)
        if any(abs(int(step.rsplit("=", 1)[1])) > max_value for step in steps):
            continue
        problem = _render(tree)
        if problem in seen or problem in excluded:
            continue
        seen.add(problem)
        steps.append(f"Answer: {answer}")
        problems.append({"problem": problem, "answer": str(answer), "solution": "\n".join(steps)})
    return problems


def generate_splits(n_train: int, n_eval: int, seed: int, **knobs: int) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, held-out) problem lists: train from ``seed``, held-out from ``seed + 1``."""
    train = generate_problems(n_train, seed, **knobs)
    held_out = generate_problems(n_eval, seed + 1, exclude={p["problem"] for p in train}, **knobs)
    return train, held_out


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``CHARS`` (ids 0-3 are pad, bos, eos, unk).

    ``encode`` adds no special tokens (``resrl.data.encode_prompt`` prepends bos); ``decode`` joins
    characters with nothing in between, so ``decode(encode(s)) == s`` for every string over ``CHARS``.
    Characters outside ``CHARS`` become ``<unk>``. Round-trips through save_pretrained/from_pretrained
    (also via AutoTokenizer), chat template included.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One pre-token per character, newlines and spaces included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _rows(problems: list[dict], fmt: str, split: str) -> list[dict]:
    if fmt == "plain":
        return [{**p, "prompt": format_prompt(p["problem"]), "data_source": DATA_SOURCE} for p in problems]
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": format_prompt(p["problem"])}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p["answer"]},
            "extra_info": {"split": split, "index": i, "problem": p["problem"], "solution": p["solution"]},
        }
        for i, p in enumerate(problems)
    ]


def write_dataset(
    path: str | os.PathLike,
    n: int,
    seed: int,
    fmt: Literal["plain", "verl"] = "plain",
    *,
    split: str = "train",
    **knobs: int | Collection[str],
) -> Path:
    """Write ``generate_problems(n, seed, **knobs)`` as rows ``resrl.data.load_examples`` reads.

    The file type follows the suffix: ``.jsonl`` (one row per line), ``.json`` (a list) or
    ``.parquet``. ``fmt="plain"`` rows are ``{"problem", "answer", "solution", "prompt",
    "data_source"}``; ``fmt="verl"`` rows follow verl's RL parquet schema (message-list prompt,
    ``reward_model.ground_truth``, ``extra_info``). Returns the path written.
    """
    if fmt not in ("plain", "verl"):
        raise ValueError(f"fmt must be 'plain' or 'verl', got {fmt!r}")
    path = Path(path)
    rows = _rows(generate_problems(n, seed, **knobs), fmt, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"write_dataset writes .jsonl, .json or .parquet files, got {str(path)!r}")
    return path
