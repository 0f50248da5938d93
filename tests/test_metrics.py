"""pass@k against exact combinatorics, avg@n, maj@k tie rules and summarize()."""

from fractions import Fraction
from math import comb

import pytest

from resrl.eval import avg_at_n, maj_at_k, pass_at_k, summarize


def _exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 32])
def test_pass_at_k_matches_exact_combinatorics(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [
        (1024, 0, 1),
        (1024, 1, 1),
        (1024, 1, 512),
        (1024, 3, 256),
        (1024, 100, 16),
        (1024, 512, 1024),
        (1000, 999, 7),
    ],
)
def test_pass_at_k_large_n_is_stable(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact_pass_at_k(n, c, k)), rel=1e-9, abs=1e-15)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        pytest.param((4, 1, 5), ValueError, id="k-above-n"),
        pytest.param((4, 1, 0), ValueError, id="k-zero"),
        pytest.param((4, 5, 1), ValueError, id="c-above-n"),
        pytest.param((4, -1, 1), ValueError, id="c-negative"),
        pytest.param((0, 0, 1), ValueError, id="n-zero"),
        pytest.param((-2, 0, 1), ValueError, id="n-negative"),
        pytest.param((4.0, 1, 1), TypeError, id="float-n"),
        pytest.param((4, True, 1), TypeError, id="bool-c"),
    ],
)
def test_pass_at_k_rejects_bad_counts(args, error):
    with pytest.raises(error):
        pass_at_k(*args)


def test_avg_at_n():
    assert avg_at_n([True, False, True, True]) == 0.75
    assert avg_at_n([False]) == 0.0
    with pytest.raises(ValueError):
        avg_at_n([])


@pytest.mark.parametrize(
    ("answers", "correct", "k", "expected"),
    [
        pytest.param(["3", "3", "4"], [True, True, False], 3, 1.0, id="majority-right"),
        pytest.param(["4", "3", "4"], [False, True, False], 3, 0.0, id="majority-wrong"),
        pytest.param(["2", "3", "3", "2"], [False, True, True, False], 4, 0.0, id="tie-first-seen-wins"),
        pytest.param(["3", "2", "2", "3"], [True, False, False, True], 4, 1.0, id="tie-first-seen-wins-2"),
        pytest.param([None, None, None, "5"], [False, False, False, True], 4, 1.0, id="none-never-wins"),
        pytest.param([None, None], [False, False], 2, 0.0, id="all-none"),
        pytest.param(["1", "2", "2", "2"], [True, False, False, False], 1, 1.0, id="only-first-k"),
        pytest.param(["1", "2", "2", "2"], [True, False, False, False], 4, 0.0, id="all-k"),
    ],
)
def test_maj_at_k(answers, correct, k, expected):
    assert maj_at_k(answers, correct, k) == expected


def test_maj_at_k_validation():
    with pytest.raises(ValueError, match="length"):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError, match="k"):
        maj_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError, match="k"):
        maj_at_k(["1", "2"], [True, False], 0)


def _row(correct, answers, source="arithmetic"):
    return {
        "n": len(correct),
        "c": sum(correct),
        "answers": answers,
        "correct": correct,
        "data_source": source,
    }


def test_summarize_keys_and_values():
    rows = [
        _row([True, False, False, False, True, False], ["1", "2", "2", None, "1", "3"]),
        _row([False] * 6, ["7"] * 6),
    ]
    out = summarize(rows)
    assert list(out) == ["pass@1", "pass@2", "pass@4", "pass@6", "avg@6", "maj@6"]
    assert out["pass@1"] == pytest.approx(out["avg@6"])
    assert out["avg@6"] == pytest.approx((2 / 6 + 0) / 2)
    assert out["pass@6"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(float(_exact_pass_at_k(6, 2, 2)) / 2)
    # Problem 0: "1" and "2" tie at two votes, "1" came first and is correct.
    assert out["maj@6"] == pytest.approx(0.5)


def test_summarize_power_of_two_n_and_sources():
    rows = [_row([True] * 8, ["5"] * 8, "a"), _row([False] * 8, ["4"] * 8, "b")]
    out = summarize(rows)
    assert [key for key in out if "/" not in key] == [
        "pass@1",
        "pass@2",
        "pass@4",
        "pass@8",
        "avg@8",
        "maj@8",
    ]
    assert out["a/pass@1"] == 1.0 and out["b/pass@8"] == 0.0 and out["pass@8"] == 0.5
    single = summarize([_row([True], ["1"])])
    assert single == {"pass@1": 1.0, "avg@1": 1.0, "maj@1": 1.0}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        pytest.param([], "at least one", id="empty"),
        pytest.param([_row([True], ["1"]), _row([True, False], ["1", "2"])], "same number", id="mixed-n"),
        pytest.param([{**_row([True, False], ["1", "2"]), "c": 2}], "c=2", id="c-mismatch"),
        pytest.param([{**_row([True, False], ["1", "2"]), "n": 3}], "n=3", id="n-mismatch"),
        pytest.param([{"n": 1, "c": 1, "correct": [True]}], "answers", id="missing-answers"),
    ],
)
def test_summarize_validation(rows, message):
    with pytest.raises(ValueError, match=message):
        summarize(rows)
