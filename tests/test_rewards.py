"""Answer extraction, time-limited verification, length shaping and the reward registry."""

import math
import threading

import pytest

from resrl.rewards import (
    MAX_ANSWER_CHARS,
    available_rewards,
    extract_answer,
    get_reward,
    length_scaled_reward,
    register_reward,
    verify_answer,
)
from resrl.rewards import registry as registry_module

PATHOLOGICAL = "\\boxed{9^{9^{9^{9^9}}}}"
# Generous liveness bound: worker start-up (not charged to timeout_s) plus the timeout on a slow CI box.
HANG_BOUND_S = 60.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("so \\boxed{42}.", "42", id="boxed"),
        pytest.param("\\boxed {42}", "42", id="boxed-space"),
        pytest.param("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", id="nested-braces"),
        pytest.param("\\boxed{\\boxed{3}}", "3", id="nested-boxed"),
        pytest.param("\\boxed{\\{1,2\\}}", "\\{1,2\\}", id="escaped-braces"),
        pytest.param("\\boxed{1} then \\boxed{2}", "2", id="last-boxed-wins"),
        pytest.param("\\boxed{1} then \\boxed{2", "1", id="unclosed-last-boxed-ignored"),
        pytest.param("\\fbox{7}", "7", id="fbox"),
        pytest.param("Answer: 5\n\\boxed{6}", "6", id="boxed-beats-answer-line"),
        pytest.param("3+4=7\nAnswer: 7", "7", id="answer-line"),
        pytest.param("Answer: 1\nAnswer: 2\n", "2", id="last-answer-wins"),
        pytest.param("Answer: -12.", "-12", id="trailing-period"),
        pytest.param("Answer: $\\frac{3}{4}$ ", "\\frac{3}{4}", id="dollars"),
        pytest.param("Final answer: **8**", "8", id="final-answer-bold"),
        pytest.param("answer:9 and more\nnext line", "9 and more", id="rest-of-line"),
        pytest.param("Answer:", None, id="empty-answer-line"),
        pytest.param("Answer:   .\n", None, id="blank-answer-line"),
        pytest.param("the result is 9", None, id="no-answer"),
        pytest.param("", None, id="empty"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        extract_answer(None)


def test_extract_answer_long_inputs_stay_linear():
    text = "\\boxed{" * 20000 + "Answer: 3\n" * 2000
    assert extract_answer(text) == "3"
    assert extract_answer("x" * 100_000 + "\\boxed{5}") == "5"


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        pytest.param("3+4=7\nAnswer: 7", "7", True, id="int"),
        pytest.param("Answer: -12", "-12", True, id="negative"),
        pytest.param("Answer: -12", "12", False, id="negative-vs-positive"),
        pytest.param("Answer: 8", "9", False, id="wrong-int"),
        pytest.param("Answer: 9.0", "9", True, id="decimal-equals-int"),
        pytest.param("\\boxed{\\frac{1}{2}}", "0.5", True, id="frac-vs-decimal"),
        pytest.param("Answer: 1/2", "\\frac{1}{2}", True, id="slash-frac"),
        pytest.param("Answer: -\\frac{3}{4}", "-0.75", True, id="negative-frac"),
        pytest.param("\\boxed{\\frac{1}{3}}", "\\frac{2}{6}", True, id="unreduced-frac"),
        pytest.param("\\boxed{\\frac{1}{3}}", "0.5", False, id="wrong-frac"),
        pytest.param("Answer: 0.333333", "1/3", True, id="math-verify-rounding"),
        pytest.param("Answer: 0.3", "1/3", False, id="decimal-too-coarse"),
        pytest.param("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True, id="latex-surd"),
        pytest.param("\\boxed{x+1}", "1+x", True, id="latex-symbolic"),
        pytest.param("\\boxed{x+2}", "1+x", False, id="latex-symbolic-wrong"),
        pytest.param("Answer: $\\pi$", "\\pi", True, id="latex-pi"),
        pytest.param("\\boxed{9}", "\\boxed{9}", True, id="boxed-ground-truth"),
        pytest.param("Answer: 9", "$9$", True, id="dollar-ground-truth"),
        pytest.param("Answer: banana", "9", False, id="garbage-answer"),
        pytest.param("@@##!!", "9", False, id="garbage-no-answer"),
        pytest.param("", "9", False, id="empty-response"),
        pytest.param("Answer: 9" + "0" * (MAX_ANSWER_CHARS + 1), "9", False, id="overlong-answer"),
    ],
)
def test_verify_answer(response, truth, expected):
    assert verify_answer(response, truth) is expected


def test_verify_answer_bad_arguments():
    with pytest.raises(TypeError, match="response"):
        verify_answer(None, "9")
    with pytest.raises(TypeError, match="ground_truth"):
        verify_answer("Answer: 9", 9)
    with pytest.raises(ValueError, match="timeout_s"):
        verify_answer("Answer: 9", "9", timeout_s=0)
    with pytest.raises(ValueError, match="no answer"):
        verify_answer("Answer: 9", "  ")


def _run_bounded(fn):
    """Run ``fn`` on a daemon thread; fail (instead of hanging the suite) if it never returns."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(HANG_BOUND_S)
    assert not thread.is_alive(), f"verification did not return within {HANG_BOUND_S}s"
    return result[0]


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(PATHOLOGICAL, id="power-tower"),
        pytest.param("Answer: " + "1+" * 50_000 + "1", id="100k-chars"),
        pytest.param("\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}", id="deep-parens"),
    ],
)
def test_verify_pathological_returns_false(response):
    assert _run_bounded(lambda: verify_answer(response, "9", timeout_s=1.0)) is False


def test_verify_timeout_off_main_thread_then_recovers():
    # Several threads at once: each needs its own worker, and signal-based timeouts could not work here.
    results = []

    def work():
        results.append(
            (verify_answer(PATHOLOGICAL, "9", timeout_s=0.5), verify_answer("\\boxed{x+1}", "1+x"))
        )

    threads = [threading.Thread(target=work, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_BOUND_S)
    assert not any(thread.is_alive() for thread in threads)
    assert results == [(False, True), (False, True)]
    # The killed workers are replaced transparently.
    assert verify_answer("\\boxed{2x}", "x*2") is True


def test_integer_fast_path_never_starts_a_worker(monkeypatch):
    from resrl.rewards import verify as verify_module

    def forbidden(*args, **kwargs):
        raise AssertionError("plain integers must be compared without math-verify")

    monkeypatch.setattr(verify_module._POOL, "verify", forbidden)
    assert verify_answer("1+2=3\nAnswer: 3", "3") is True
    assert verify_answer("Answer: -4", "4") is False
    assert verify_answer("\\boxed{3/4}", "\\frac{6}{8}") is True


L0, LMAX, S = 10, 20, 0.5


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        pytest.param(0, 1.0, id="empty"),
        pytest.param(L0, 1.0, id="at-l0"),
        pytest.param(L0 + 1, 1.0 - (1 - S) * 1 / (LMAX - L0), id="just-past-l0"),
        pytest.param((L0 + LMAX) // 2, 1.0 - (1 - S) / 2, id="midpoint"),
        pytest.param(LMAX, S, id="at-lmax"),
        pytest.param(LMAX + 1, S, id="past-lmax"),
        pytest.param(10**6, S, id="far-past-lmax"),
    ],
)
def test_length_scaled_reward_breakpoints(length, expected):
    assert length_scaled_reward(1.0, length, l0=L0, lmax=LMAX, scale=S) == pytest.approx(expected, abs=1e-12)
    assert length_scaled_reward(2.0, length, l0=L0, lmax=LMAX, scale=S) == pytest.approx(
        2 * expected, abs=1e-12
    )


def test_length_scaled_reward_defaults_and_non_positive():
    assert length_scaled_reward(1.0, 3500) == 1.0
    assert length_scaled_reward(1.0, 4096) == pytest.approx(0.7)
    for length in (0, 3800, 5000):
        assert length_scaled_reward(-1.0, length) == -1.0
        assert length_scaled_reward(0.0, length) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"l0": 20, "lmax": 20}, id="l0-equals-lmax"),
        pytest.param({"l0": 30, "lmax": 20}, id="l0-above-lmax"),
        pytest.param({"scale": -0.1}, id="scale-negative"),
        pytest.param({"scale": 1.5}, id="scale-above-one"),
        pytest.param({"length": -1}, id="negative-length"),
        pytest.param({"reward": math.nan}, id="nan-reward"),
    ],
)
def test_length_scaled_reward_validation(kwargs):
    args = {"reward": 1.0, "length": 5, **kwargs}
    with pytest.raises(ValueError):
        length_scaled_reward(args.pop("reward"), args.pop("length"), **args)


def test_math_reward():
    reward = get_reward("math")
    assert "math" in available_rewards()
    assert reward("Answer: 9", "9", truncated=False, negative_reward=-1.0) == 1.0
    assert reward("Answer: 8", "9", truncated=False, negative_reward=-1.0) == -1.0
    assert reward("Answer: 8", "9", truncated=False, negative_reward=0.0) == 0.0
    # A cut-off response is wrong even if it already wrote the right answer.
    assert reward("Answer: 9", "9", truncated=True, negative_reward=-1.0) == -1.0
    with pytest.raises(ValueError, match="negative_reward"):
        reward("Answer: 9", "9", truncated=False, negative_reward=0.5)


def test_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_reward("always-one")
    def always_one(response, ground_truth, *, truncated, negative_reward):
        return 1.0

    assert get_reward("always-one") is always_one
    assert available_rewards() == ["always-one", "math"]
    register_reward("always-one")(always_one)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("always-one")(lambda *a, **k: 0.0)
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; available: always-one, math"):
        get_reward("nope")
    with pytest.raises(ValueError, match="non-empty"):
        register_reward("")


def test_many_integer_answers():
    for i in range(-500, 500):
        assert verify_answer(f"{i}+1={i + 1}\nAnswer: {i + 1}", str(i + 1)) is True
        assert verify_answer(f"Answer: {i}", str(i + 1)) is False


# A step's answers: fast-path ints and fractions, symbolic ones that need math-verify, no answer,
# a truncated one, duplicates of each kind and one pathological answer (twice).
BATCH = [
    ("3+4=7\nAnswer: 7", "7"),
    ("Answer: 8", "7"),
    ("\\boxed{x+1}", "1+x"),
    ("\\boxed{x+2}", "1+x"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
    ("no answer here", "3"),
    ("Answer: 0.333333", "1/3"),
    (PATHOLOGICAL, "9"),
    ("\\boxed{x+1}", "1+x"),
    ("so \\boxed{x + 1}", "1+x"),
    ("\\boxed{x+1}", "x+1"),
    (PATHOLOGICAL, "9"),
    ("Answer: 7", "7"),
]


@pytest.mark.parametrize("workers", [1, 2, 5], ids=lambda w: f"workers{w}")
def test_verify_batch_matches_serial_verification(workers):
    from resrl.rewards import verify_batch

    responses, truths = zip(*BATCH, strict=True)
    expected = [verify_answer(r, t, timeout_s=5.0) for r, t in BATCH]
    found = _run_bounded(lambda: verify_batch(responses, truths, timeout_s=5.0, workers=workers))
    assert found.verdicts == expected
    assert expected[:5] == [True, False, True, False, True]
    # Sent to math-verify, each once: x+1 (two responses), "x + 1" (another text), x+2, the surd,
    # 0.333333 and the power tower (two responses, one timeout). x+1 against x+1 is equal text.
    assert (found.checked, found.reused, found.timed_out) == (6, 2, 1)


def test_verify_batch_checks_each_distinct_pair_once_in_a_bounded_pool(monkeypatch):
    from resrl.rewards import verify as verify_module
    from resrl.rewards import verify_batch

    calls, lock = [], threading.Lock()
    running, most = [0], [0]

    def fake(gold, pred, timeout_s):
        with lock:
            calls.append((gold, pred))
            running[0] += 1
            most[0] = max(most[0], running[0])
        # Long enough that the pool's threads overlap.
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return pred == "x+1"

    monkeypatch.setattr(verify_module._POOL, "verify", fake)
    responses = [f"\\boxed{{x+{i % 7}}}" for i in range(70)]
    found = verify_batch(responses, ["1+x"] * 70, workers=3)
    assert sorted(calls) == sorted({("1+x", f"x+{i}") for i in range(7)})
    assert found.verdicts == [i % 7 == 1 for i in range(70)]
    assert (found.checked, found.reused) == (7, 63)
    assert 1 < most[0] <= 3


def test_verify_batch_bad_arguments():
    from resrl.rewards import verify_batch

    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        verify_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        verify_batch(["a"], ["1"], workers=0)
    with pytest.raises(TypeError, match="response must be a str"):
        verify_batch([None], ["1"])
    assert verify_batch([], []).verdicts == []


def test_batch_math_reward_equals_per_sample_reward():
    from resrl.rewards import get_batch_reward

    reward = get_reward("math")
    responses, truths = zip(*BATCH, strict=True)
    truncated = [i % 4 == 0 for i in range(len(BATCH))]
    for negative in (-1.0, 0.0):
        expected = [
            reward(r, t, truncated=c, negative_reward=negative)
            for r, t, c in zip(responses, truths, truncated, strict=True)
        ]
        found = get_batch_reward("math")(responses, truths, truncated=truncated, negative_reward=negative)
        assert found == expected
    with pytest.raises(ValueError, match="negative_reward"):
        get_batch_reward("math")(["Answer: 1"], ["1"], truncated=[False], negative_reward=0.5)
    with pytest.raises(ValueError, match="one of each per response"):
        get_batch_reward("math")(["Answer: 1"], ["1"], truncated=[], negative_reward=0.0)


def test_batch_of_a_registered_reward_calls_it_once_per_distinct_input(monkeypatch):
    from resrl.rewards import get_batch_reward

    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    seen = []

    @register_reward("length")
    def length(response, ground_truth, *, truncated, negative_reward):
        seen.append((response, ground_truth, truncated))
        return negative_reward if truncated else float(len(response))

    out = get_batch_reward("length")(
        ["ab", "ab", "abc", "ab"],
        ["1", "1", "1", "2"],
        truncated=[False, False, False, True],
        negative_reward=-1,
    )
    assert out == [2.0, 2.0, 3.0, -1.0]
    assert seen == [("ab", "1", False), ("abc", "1", False), ("ab", "2", True)]
