"""The synthetic arithmetic task and its character tokenizer."""

import ast
import operator
import re

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from resrl.rewards import extract_answer, verify_answer
from resrl.tasks import build_char_tokenizer, format_prompt, generate_problems, generate_splits, write_dataset

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str, *, negatives: bool = False) -> int:
    """Independent evaluator: Python's own parser and precedence rules, + - * on ints only
    (negative literals such as ``7*(-3)`` only where ``negatives``: worked steps, not problems)."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if negatives and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise AssertionError(f"unexpected syntax in {expression!r}: {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(500, seed=0)


def test_generator_is_deterministic_per_seed(problems):
    assert generate_problems(500, seed=0) == problems
    assert generate_problems(50, seed=0) == problems[:50]
    assert generate_problems(50, seed=1) != problems[:50]
    assert generate_problems(0, seed=0) == []


def test_solutions_are_consistent(problems):
    for p in problems:
        assert set(p) == {"problem", "answer", "solution"}
        assert str(_evaluate(p["problem"])) == p["answer"], p
        lines = p["solution"].split("\n")
        assert lines[-1] == f"Answer: {p['answer']}"
        assert extract_answer(p["solution"]) == p["answer"]
        assert verify_answer(p["solution"], p["answer"]) is True
        # Every worked step is true arithmetic, and the last step produces the answer.
        for step in lines[:-1]:
            lhs, rhs = step.split("=")
            assert _evaluate(lhs, negatives=True) == int(rhs), step
        assert lines[-2].split("=")[1] == p["answer"]


def test_default_problems_are_short_and_varied(problems):
    assert max(len(format_prompt(p["problem"])) for p in problems) <= 30
    assert max(len(p["solution"]) for p in problems) <= 50
    assert len({p["problem"] for p in problems}) == len(problems)
    assert any(p["answer"].startswith("-") for p in problems)
    assert {op for p in problems for op in "+-*" if op in p["problem"]} == {"+", "-", "*"}


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"min_ops": 1, "max_ops": 1}, id="one-op"),
        pytest.param({"min_ops": 3, "max_ops": 4, "max_operand": 5, "max_value": 50}, id="harder"),
        pytest.param({"min_ops": 2, "max_ops": 2, "max_operand": 20, "max_value": 400}, id="big-operands"),
    ],
)
def test_difficulty_knobs(knobs):
    for p in generate_problems(200, seed=3, **knobs):
        operands = [int(x) for x in re.findall(r"\d+", p["problem"])]
        assert knobs["min_ops"] <= len(operands) - 1 <= knobs["max_ops"]
        assert all(1 <= x <= knobs.get("max_operand", 9) for x in operands)
        values = [int(step.split("=")[1]) for step in p["solution"].split("\n")[:-1]]
        assert all(abs(v) <= knobs.get("max_value", 99) for v in values)


def test_exclude_and_splits_are_disjoint():
    train, held_out = generate_splits(400, 200, seed=0)
    assert len(train) == 400 and len(held_out) == 200
    assert not {p["problem"] for p in train} & {p["problem"] for p in held_out}
    assert train == generate_problems(400, seed=0)
    banned = {p["problem"] for p in generate_problems(20, seed=5)}
    assert not banned & {p["problem"] for p in generate_problems(100, seed=5, exclude=banned)}


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"n": -1, "seed": 0}, id="negative-n"),
        pytest.param({"n": 1, "seed": "0"}, id="str-seed"),
        pytest.param({"n": 1, "seed": 0, "min_ops": 0}, id="zero-ops"),
        pytest.param({"n": 1, "seed": 0, "min_ops": 3, "max_ops": 2}, id="min-above-max"),
        pytest.param({"n": 1, "seed": 0, "max_operand": 0}, id="zero-operand"),
        pytest.param({"n": 1, "seed": 0, "max_operand": 9, "max_value": 5}, id="max-value-below-operand"),
    ],
)
def test_generator_rejects_bad_knobs(kwargs):
    with pytest.raises(ValueError):
        generate_problems(**kwargs)


def test_generator_reports_exhausted_space():
    # With one op over the operand 1 only "1+1", "1-1", "1*1" exist.
    assert len(generate_problems(3, seed=0, min_ops=1, max_ops=1, max_operand=1)) == 3
    with pytest.raises(ValueError, match="only 3 distinct problems"):
        generate_problems(4, seed=0, min_ops=1, max_ops=1, max_operand=1)


def test_format_prompt():
    assert format_prompt("(3+4)*2-5") == "Q: (3+4)*2-5\n"
    with pytest.raises(ValueError):
        format_prompt("")


def test_char_tokenizer_round_trips_every_task_string(problems):
    tok = build_char_tokenizer()
    assert len(tok) < 64
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert None not in specials and len(set(specials)) == 4
    for p in problems:
        text = format_prompt(p["problem"]) + p["solution"]
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    odd = "  Answer:  -12 \n\n x?"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd
    assert (
        tok.decode(
            [tok.bos_token_id, *tok.encode("1+1", add_special_tokens=False), tok.eos_token_id],
            skip_special_tokens=True,
        )
        == "1+1"
    )
    assert tok.encode("#", add_special_tokens=False) == [tok.unk_token_id]


@pytest.mark.parametrize("loader", [PreTrainedTokenizerFast, AutoTokenizer], ids=["fast", "auto"])
def test_char_tokenizer_save_and_load(tmp_path, problems, loader):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert loaded.chat_template == tok.chat_template
    text = format_prompt(problems[0]["problem"]) + problems[0]["solution"]
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert loaded.decode(ids) == text


def test_write_dataset_rejects_bad_format_and_suffix(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        write_dataset(tmp_path / "a.jsonl", 2, 0, fmt="csv")
    with pytest.raises(ValueError, match="suffix|.jsonl"):
        write_dataset(tmp_path / "a.csv", 2, 0)
