"""Dataset loading (JSONL / JSON / Parquet, verl and plain rows), error messages, prompt encoding."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resrl.data import DataError, Example, encode_prompt, load_examples
from resrl.tasks import build_char_tokenizer, format_prompt, generate_problems, write_dataset

VERL_ROW = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "2"},
    "extra_info": {"split": "train", "index": 7},
}
PLAIN_ROW = {"problem": "2*3?", "answer": "6"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["plain", "verl"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_then_load_arithmetic(tmp_path, fmt, suffix):
    path = write_dataset(tmp_path / f"train{suffix}", 12, seed=4, fmt=fmt)
    examples = load_examples(path)
    problems = generate_problems(12, seed=4)
    assert [e.answer for e in examples] == [p["answer"] for p in problems]
    assert [e.index for e in examples] == list(range(12))
    assert {e.data_source for e in examples} == {"arithmetic"}
    for e, p in zip(examples, problems, strict=True):
        if fmt == "plain":
            assert e.prompt == format_prompt(p["problem"])
        else:
            assert e.prompt == [{"role": "user", "content": format_prompt(p["problem"])}]


def test_load_mixed_jsonl_rows(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [VERL_ROW, PLAIN_ROW, {"prompt": "Say 3", "answer": 3}])
    examples = load_examples(path)
    assert examples == [
        Example(prompt=VERL_ROW["prompt"], answer="2", data_source="openai/gsm8k", index=0),
        Example(prompt="2*3?", answer="6", data_source="unknown", index=1),
        Example(prompt="Say 3", answer="3", data_source="unknown", index=2),
    ]


def test_load_parquet_written_here(tmp_path):
    rows = [dict(VERL_ROW), {**VERL_ROW, "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"}}]
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = load_examples(path)
    assert [e.answer for e in examples] == ["2", "\\frac{1}{2}"]
    assert examples[0].prompt == VERL_ROW["prompt"]
    # Plain rows with an integer answer column (as pandas-made parquet files often have).
    plain = tmp_path / "plain.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "1+2", "answer": 3}, {"problem": "2-5", "answer": -3}]), plain
    )
    assert [(e.prompt, e.answer) for e in load_examples(plain)] == [("1+2", "3"), ("2-5", "-3")]


def test_load_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([PLAIN_ROW, VERL_ROW]), encoding="utf-8")
    assert [e.answer for e in load_examples(path)] == ["6", "2"]


@pytest.mark.parametrize(
    ("rows", "row", "field"),
    [
        pytest.param(
            [PLAIN_ROW, {**VERL_ROW, "reward_model": {"style": "rule"}}],
            2,
            "reward_model.ground_truth",
            id="missing-ground-truth",
        ),
        pytest.param([{**VERL_ROW, "reward_model": "2"}], 1, "reward_model", id="reward-model-not-object"),
        pytest.param(
            [{k: v for k, v in VERL_ROW.items() if k != "prompt"}], 1, "prompt", id="verl-missing-prompt"
        ),
        pytest.param(
            [{**VERL_ROW, "prompt": [{"role": "user", "content": 5}]}],
            1,
            "prompt[0].content",
            id="bad-message",
        ),
        pytest.param([{**VERL_ROW, "prompt": []}], 1, "prompt", id="empty-messages"),
        pytest.param([PLAIN_ROW, PLAIN_ROW, {"problem": "x"}], 3, "answer", id="missing-answer"),
        pytest.param([{"answer": "1"}], 1, "problem", id="missing-problem"),
        pytest.param([{"problem": "", "answer": "1"}], 1, "problem", id="empty-problem"),
        pytest.param([{"problem": "1+1", "answer": True}], 1, "answer", id="bool-answer"),
        pytest.param([{"problem": "1+1", "answer": " "}], 1, "answer", id="blank-answer"),
        pytest.param([{**PLAIN_ROW, "data_source": 3}], 1, "data_source", id="bad-data-source"),
        pytest.param([{"question": "1+1", "solution": "2"}], 1, "<row>", id="unknown-row-kind"),
        pytest.param([[1, 2]], 1, "<row>", id="row-not-object"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, rows, row, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message and f"row {row}:" in message and repr(field) in message, message


def test_jsonl_rows_are_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(PLAIN_ROW) + "\n\n" + json.dumps({"problem": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 3: field 'answer'"):
        load_examples(path)
    path.write_text(json.dumps(PLAIN_ROW) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: field '<row>': not valid JSON"):
        load_examples(path)


def test_malformed_parquet_and_json_rows(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": None}]), path
    )
    with pytest.raises(DataError, match=r"bad.parquet: row 2: field 'answer'"):
        load_examples(path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([PLAIN_ROW, {"problem": "x"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: row 2: field 'answer'"):
        load_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param("empty.jsonl", "", "no rows", id="empty-jsonl"),
        pytest.param("blank.jsonl", "\n \n", "no rows", id="blank-jsonl"),
        pytest.param("empty.json", "[]", "no rows", id="empty-json-list"),
        pytest.param("dict.json", '{"problem": "x"}', "must be a list", id="json-not-list"),
        pytest.param("broken.json", "[{", "not valid JSON", id="broken-json"),
        pytest.param("rows.csv", "problem,answer\n", "unsupported file type '.csv'", id="bad-suffix"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


def test_encode_prompt_with_char_tokenizer():
    tok = build_char_tokenizer()
    text = format_prompt("(3+4)*2")
    expected = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    assert encode_prompt(Example(prompt=text, answer="14"), tok) == expected
    # A verl message prompt renders to the same tokens through the char tokenizer's chat template.
    messages = [{"role": "user", "content": text}]
    assert encode_prompt(Example(prompt=messages, answer="14"), tok) == expected
    assert tok.decode(expected[1:]) == text


def test_encode_prompt_without_chat_template():
    tok = build_char_tokenizer()
    tok.chat_template = None
    ids = encode_prompt(Example(prompt="Q: 1+1\n", answer="2"), tok)
    assert ids == [tok.bos_token_id, *tok.encode("Q: 1+1\n", add_special_tokens=False)]
    with pytest.raises(ValueError, match="chat_template"):
        encode_prompt(Example(prompt=[{"role": "user", "content": "Q"}], answer="2"), tok)
