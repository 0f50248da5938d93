"""The evaluation runner, diversity metrics and pass@k plots, against a scripted fake engine.

The fake engine answers each prompt from a fixed script, so every metric below is computed by hand.
One end-to-end case runs the real HF engine on a tiny random model (structure only).
"""

import json
import math

import pytest

from resrl.data import Example, encode_prompt
from resrl.eval import (
    EvalResult,
    canonical_answer,
    distinct_answers,
    distinct_correct_answers,
    distinct_correct_solutions,
    diversity_metrics,
    evaluate,
    load_curve,
    plot_pass_at_k,
)
from resrl.eval.evaluate import chunk_seed
from resrl.rollout import Sample, SamplingParams
from resrl.tasks import build_char_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


class ScriptedEngine:
    """A `RolloutEngine` that returns scripted (response, truncated) pairs per prompt text.

    Sample j of a prompt is script entry (j + shift) % len, where shift is `params.seed` when
    `seed_shifts` else 0. Non-truncated responses end with EOS. Every token of entry e has sampling
    log-prob -0.1 * (e + 1). Calls are recorded.
    """

    def __init__(self, tokenizer, script, *, seed_shifts=False):
        self.tok, self.script, self.seed_shifts = tokenizer, script, seed_shifts
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        shift = params.seed if self.seed_shifts else 0
        out = []
        for ids in prompts:
            options = self.script[self.tok.decode(ids, skip_special_tokens=True)]
            samples = []
            for j in range(params.n):
                e = (j + shift) % len(options)
                text, truncated = options[e]
                rid = self.tok.encode(text, add_special_tokens=False)
                rid = rid if truncated else [*rid, self.tok.eos_token_id]
                samples.append(Sample(list(ids), rid, [-0.1 * (e + 1)] * len(rid), truncated, text))
            out.append(samples)
        return out

    def sync_weights(self, model):
        pass

    def close(self):
        pass


# Three problems, n=4. Hand-computed: c = 2, 1, 3; canonical answers as listed in the tests.
SCRIPT = {
    "Q: 1+2\n": [
        ("1+2=3\nAnswer: 3", False),
        ("1+2=4\nAnswer: 4", False),
        ("1+2=3\nAnswer: 03", False),
        ("1+2=4\nAnswer: 4", False),
    ],
    "Q: 2+3\n": [
        ("Answer: 2", False),
        ("Answer: 2", False),
        ("Answer: 5", False),
        ("no answer", False),
    ],
    "Q: 1/2\n": [
        ("Answer: 0.5", False),
        ("Answer: 1/2", False),
        ("Answer:   1/2", False),
        ("Answer: 1/2", True),
    ],
}
EXAMPLES = [
    Example(prompt="Q: 1+2\n", answer="3", data_source="arith", index=0),
    Example(prompt=[{"role": "user", "content": "Q: 2+3\n"}], answer="5", data_source="arith", index=1),
    Example(prompt="Q: 1/2\n", answer="1/2", data_source="frac", index=2),
]


def _run(tok, engine=None, **kw):
    engine = engine or ScriptedEngine(tok, SCRIPT)
    args = {"n": 4, "temperature": 1.0, "max_new_tokens": 32, **kw}
    return evaluate(engine, EXAMPLES, tok, **args)


def test_rows_hold_scored_samples(tok):
    rows = _run(tok).rows
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["c"] for r in rows] == [2, 1, 3]
    assert rows[0]["correct"] == [True, False, True, False]
    assert rows[0]["answers"] == ["3", "4", "3", "4"]
    assert rows[1]["answers"] == ["2", "2", "5", None]
    # The truncated sample names a right answer but is wrong and casts no vote.
    assert rows[2]["correct"] == [True, True, True, False]
    assert rows[2]["answers"] == ["1/2", "1/2", "1/2", None]
    assert rows[2]["truncated"] == [False, False, False, True]
    assert rows[1]["prompt"] == "Q: 2+3\n" and rows[2]["answer"] == "1/2"
    assert rows[0]["responses"] == [t for t, _ in SCRIPT["Q: 1+2\n"]]
    assert rows[0]["lengths"] == [len(t) + 1 for t, _ in SCRIPT["Q: 1+2\n"]]
    assert rows[2]["lengths"][3] == len("Answer: 1/2")
    assert rows[0]["mean_logprob"] == pytest.approx([-0.1, -0.2, -0.3, -0.4])


def test_summary_matches_hand_computed_metrics(tok):
    s = _run(tok).summary
    assert s["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    # pass@2 per problem: 1 - C(n-c,2)/C(4,2) = 1 - 1/6, 1 - 3/6, 1.
    assert s["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["avg@4"] == pytest.approx(0.5)
    # maj: "3" wins a 2-2 tie by coming first (right), "2" beats "5" (wrong), "1/2" (right).
    assert s["maj@4"] == pytest.approx(2 / 3)
    assert s["frac/pass@1"] == pytest.approx(0.75) and s["arith/maj@4"] == pytest.approx(0.5)
    assert s["distinct_correct_solutions"] == pytest.approx((2 + 1 + 2) / 3)
    assert s["distinct_correct_answers"] == pytest.approx(1.0)
    assert s["distinct_answers"] == pytest.approx((2 + 2 + 1) / 3)
    lengths = [len(t) + (0 if trunc else 1) for opts in SCRIPT.values() for t, trunc in opts]
    nll = sum(n * 0.1 * (e % 4 + 1) for e, n in enumerate(lengths)) / sum(lengths)
    assert s["mean_response_length"] == pytest.approx(sum(lengths) / 12)
    assert s["mean_token_nll"] == pytest.approx(nll)
    assert s["truncated_frac"] == pytest.approx(1 / 12)
    assert s["n_problems"] == 3 and s["n_samples"] == 12


def test_engine_gets_encoded_prompts_and_per_chunk_seeds(tok):
    engine = ScriptedEngine(tok, SCRIPT)
    _run(tok, engine, seed=7, batch_prompts=2, temperature=0.6, top_p=0.9, max_new_tokens=20)
    assert [len(prompts) for prompts, _ in engine.calls] == [2, 1]
    assert engine.calls[0][0] == [encode_prompt(e, tok) for e in EXAMPLES[:2]]
    seeds = [params.seed for _, params in engine.calls]
    assert seeds == [chunk_seed(7, 0), chunk_seed(7, 1)] and seeds[0] != seeds[1]
    assert chunk_seed(7, 0) != chunk_seed(8, 0) and 0 <= chunk_seed(7, 0) < 2**31
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.top_p, params.max_new_tokens) == (4, 0.6, 0.9, 20)


def test_chunk_size_does_not_change_results_of_a_seed_blind_engine(tok):
    one, all_ = _run(tok, batch_prompts=1), _run(tok, batch_prompts=64)
    assert one.rows == all_.rows and one.summary == all_.summary


def test_results_are_a_function_of_the_seed(tok):
    def run(seed):
        return _run(tok, ScriptedEngine(tok, SCRIPT, seed_shifts=True), seed=seed)

    a, b = run(3), run(3)
    assert a.rows == b.rows and a.summary == b.summary
    shifted = [run(s).rows[0]["responses"] for s in range(6)]
    assert len({tuple(r) for r in shifted}) > 1


def test_parts_over_ranks_gather_to_the_one_process_result(tok):
    """Two "ranks" (part 0 and 1 of 2) each sample their chunks; the gathered result is the one
    process's, rows in problem order, with a seed-dependent engine and per-sample entropies."""

    def entropy_fn(samples):
        return [float(len(s.response_ids)) for s in samples]

    def run(**kw):
        engine = ScriptedEngine(tok, SCRIPT, seed_shifts=True)
        return _run(tok, engine, seed=5, batch_prompts=1, entropy_fn=entropy_fn, **kw), engine

    whole, _ = run()
    done = {}

    def gather_as(rank):
        def gather(mine):
            done[rank] = mine
            return [done.get(0, []), done.get(1, [])]

        return gather

    _, engine0 = run(part=(0, 2), gather=gather_as(0))
    result, engine1 = run(part=(1, 2), gather=gather_as(1))
    # Chunks 0 and 2 on rank 0, chunk 1 on rank 1.
    assert [len(c[0]) for c in engine0.calls] == [1, 1] and len(engine1.calls) == 1
    assert result.rows == whole.rows and result.summary == whole.summary
    with pytest.raises(ValueError, match="needs a gather function"):
        _run(tok, part=(0, 2))
    with pytest.raises(ValueError, match="part must be"):
        _run(tok, part=(2, 2), gather=list)


def test_entropy_fn_adds_token_weighted_entropy(tok):
    seen = []

    def entropy_fn(samples):
        seen.append(len(samples))
        return [float(len(s.response_ids) % 3) for s in samples]

    result = _run(tok, entropy_fn=entropy_fn, batch_prompts=2)
    assert seen == [8, 4]
    lengths = [n for r in result.rows for n in r["lengths"]]
    assert [e for r in result.rows for e in r["entropy"]] == [float(n % 3) for n in lengths]
    expected = sum(n * (n % 3) for n in lengths) / sum(lengths)
    assert result.summary["mean_token_entropy"] == pytest.approx(expected)


def test_progress_prints_one_line_per_chunk(tok, capsys):
    _run(tok, batch_prompts=2, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["eval: 2/3 problems", "eval: 3/3 problems"]


def test_write_produces_parsable_files(tok, tmp_path):
    result = _run(tok)
    summary_path, samples_path = result.write(tmp_path / "out", name="final")
    assert summary_path.name == "final_summary.json" and samples_path.name == "final_samples.jsonl"
    assert json.loads(summary_path.read_text()) == result.summary
    lines = samples_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.rows
    with pytest.raises(ValueError, match="name"):
        result.write(tmp_path, name="a/b")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"n": True}, "n must be"),
        ({"batch_prompts": 0}, "batch_prompts"),
        ({"reward": "nope"}, "unknown reward"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": 1.5}, "seed"),
    ],
    ids=["n_zero", "n_bool", "batch_zero", "unknown_reward", "top_p_zero", "float_seed"],
)
def test_bad_arguments_raise(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(tok, **kwargs)


def test_empty_examples_raise(tok):
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(ScriptedEngine(tok, SCRIPT), [], tok, n=2, temperature=1.0, max_new_tokens=8)


def test_engine_returning_wrong_sample_count_raises(tok):
    class Short(ScriptedEngine):
        def generate(self, prompts, params):
            return [samples[:-1] for samples in super().generate(prompts, params)]

    with pytest.raises(RuntimeError, match="asked n=4"):
        _run(tok, Short(tok, SCRIPT))


@pytest.mark.parametrize(
    ("raw", "canon"),
    [
        ("09", "9"),
        ("0.5", "1/2"),
        (" 2 / 4 ", "1/2"),
        ("-4.0", "-4"),
        ("x+1", "x+1"),
        ("1/0", "1/0"),
        ("1e999999999", "1e999999999"),
        (None, None),
    ],
    ids=[
        "leading_zero",
        "decimal",
        "spaced_fraction",
        "negative_decimal",
        "expression",
        "zero_denominator",
        "exponent_left_alone",
        "none",
    ],
)
def test_canonical_answer(raw, canon):
    assert canonical_answer(raw) == canon


DIVERSE_ROWS = [
    {
        "responses": ["a  b", "a b", "c", "d"],
        "correct": [True, True, True, False],
        "answers": ["1", "1", "2", "3"],
    },
    {"responses": ["x", "y", "z", "w"], "correct": [False] * 4, "answers": [None, "5", None, "5"]},
]


def test_diversity_metrics_on_hand_built_rows():
    assert distinct_correct_solutions(DIVERSE_ROWS) == pytest.approx((2 + 0) / 2)
    assert distinct_correct_answers(DIVERSE_ROWS) == pytest.approx((2 + 0) / 2)
    assert distinct_answers(DIVERSE_ROWS) == pytest.approx((3 + 1) / 2)
    assert diversity_metrics(DIVERSE_ROWS) == {
        "distinct_correct_solutions": 1.0,
        "distinct_correct_answers": 1.0,
        "distinct_answers": 2.0,
    }


def test_diversity_rejects_bad_rows():
    with pytest.raises(ValueError, match="at least one"):
        diversity_metrics([])
    with pytest.raises(ValueError, match="lacks 'responses'"):
        distinct_correct_solutions([{"correct": [True]}])
    with pytest.raises(ValueError, match="differ in length"):
        distinct_correct_answers([{"answers": ["1"], "correct": [True, False]}])


CURVE_A = {"pass@1": 0.3, "pass@2": 0.45, "pass@4": 0.6, "avg@4": 0.3, "arith/pass@1": 0.1}
CURVE_B = {"pass@1": 0.4, "pass@2": 0.5, "pass@4": 0.55}


def test_plot_two_curves_with_bands_writes_png(tmp_path):
    bands = {"after": {"pass@1": 0.05, "pass@2": 0.04, "pass@4": 0.02}}
    out = plot_pass_at_k(
        {"before": CURVE_A, "after": CURVE_B}, tmp_path / "plots" / "p.png", title="t", bands=bands
    )
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_single_k_curve(tmp_path):
    out = plot_pass_at_k({"greedy": {"pass@1": 0.2}}, tmp_path / "one.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("curves", "bands", "match"),
    [
        ({"a": {"avg@4": 0.3, "arith/pass@1": 0.1}}, None, "no 'pass@k' keys"),
        ({}, None, "non-empty"),
        ({"a": CURVE_B}, {"b": CURVE_B}, "not curves"),
        ({"a": CURVE_B}, {"a": {"pass@1": 0.1}}, r"pass@2"),
        ({"a": {"pass@1": float("nan")}}, None, "finite"),
    ],
    ids=["no_pass_keys", "no_curves", "band_for_unknown_label", "band_missing_k", "nan_value"],
)
def test_plot_rejects_bad_curves(tmp_path, curves, bands, match):
    with pytest.raises(ValueError, match=match):
        plot_pass_at_k(curves, tmp_path / "bad.png", bands=bands)


def test_load_curve_reads_eval_and_trainer_summaries(tmp_path, tok):
    summary_path, _ = _run(tok).write(tmp_path)
    curve = load_curve(summary_path)
    assert curve["pass@1"] == pytest.approx(0.5) and "pass@4" in curve
    trainer = tmp_path / "summary.json"
    trainer.write_text(json.dumps({"steps": 10, "eval_before": CURVE_A, "eval_after": CURVE_B, "name": "x"}))
    assert load_curve(f"{trainer}:eval_after") == CURVE_B
    assert load_curve(f"{trainer}:eval_before")["pass@4"] == 0.6
    with pytest.raises(ValueError, match="eval_after"):
        load_curve(trainer)
    with pytest.raises(ValueError, match="no metrics object under 'eval_middle'"):
        load_curve(f"{trainer}:eval_middle")
    with pytest.raises(FileNotFoundError):
        load_curve(tmp_path / "missing.json")


def test_end_to_end_with_hf_engine_on_a_tiny_model(tmp_path):
    from resrl.model import build_qwen3
    from resrl.rollout.hf import HFEngine

    tok = build_char_tokenizer()
    model = build_qwen3(
        vocab_size=len(tok),
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    examples = [
        Example(prompt=f"Q: {a}+{a}\n", answer=str(2 * a), data_source="arith", index=a) for a in range(4)
    ]
    result = evaluate(
        HFEngine(model, tok), examples, tok, n=4, temperature=1.0, max_new_tokens=16, seed=1, batch_prompts=3
    )
    assert isinstance(result, EvalResult) and len(result.rows) == 4
    for row in result.rows:
        assert row["n"] == 4 and len(row["responses"]) == len(row["lengths"]) == len(row["mean_logprob"]) == 4
        assert all(1 <= n <= 16 for n in row["lengths"])
        assert all(lp is not None and lp <= 0 for lp in row["mean_logprob"])
    s = result.summary
    assert {"pass@1", "pass@2", "pass@4", "avg@4", "maj@4", "distinct_correct_solutions"} <= set(s)
    assert 0 <= s["pass@1"] <= s["pass@4"] <= 1 and 1 <= s["mean_response_length"] <= 16
    assert s["mean_token_nll"] > 0 and math.isfinite(s["mean_token_nll"])
    assert s["n_problems"] == 4 and s["n_samples"] == 16
    again = evaluate(
        HFEngine(model, tok), examples, tok, n=4, temperature=1.0, max_new_tokens=16, seed=1, batch_prompts=3
    )
    assert again.rows == result.rows
    assert load_curve(result.write(tmp_path)[0])["pass@4"] == s["pass@4"]
