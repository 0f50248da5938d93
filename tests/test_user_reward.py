"""The user's own reward, named by `algorithm.reward=path/to/file.py:function` or
`package.module:function`: loaded at config time (every error there one line), called with the
keywords it takes from the data row, its return value and exceptions checked on the first batch, and
the same in training, `resrl eval` and `resrl compare` (the subprocess tests at the end)."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from small import SMALL_RUN

from resrl.cli import main
from resrl.config import ConfigError, resolve
from resrl.data import Example, load_examples, write_examples
from resrl.errors import InputError, UserError
from resrl.rewards import RewardError, get_batch_reward, get_reward, register_reward, score_responses
from resrl.rewards import registry as registry_module
from resrl.rewards.user import load_spec, resolve_spec
from resrl.rollout import Sample

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = "examples/my_reward.py:reward"
ROW = Example(
    prompt="Q: (3+4)*2-5\n",
    answer="9",
    data_source="arithmetic",
    index=7,
    solution="3+4=7\n7*2=14\n14-5=9\nAnswer: 9",
    extra={"extra_info": {"split": "test", "level": 2}, "ability": "math"},
)


def _write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def _load_error(spec: str) -> str:
    with pytest.raises(InputError) as info:
        load_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def _score(fn_or_spec, responses, *, rows=None, truncated=None, negative_reward=-1.0, answers=None):
    """get_batch_reward of a registered function (registered here for the test) or a spec."""
    name = fn_or_spec
    if callable(fn_or_spec):
        name = f"test-{fn_or_spec.__name__}-{id(fn_or_spec)}"
        register_reward(name)(fn_or_spec)
    return get_batch_reward(name)(
        responses,
        answers or ["9"] * len(responses),
        truncated=truncated or [False] * len(responses),
        negative_reward=negative_reward,
        rows=rows,
    )


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


# ---------------------------------------------------------------- errors at config time


def test_missing_file_names_the_path_as_typed_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _load_error("rewards/nope.py:reward")
    assert message.startswith(f"file rewards/nope.py not found (looked for {tmp_path / 'rewards/nope.py'})")
    assert "accepted: path/to/file.py:function or package.module:function" in message
    (tmp_path / "folder.py").mkdir()
    assert _load_error("folder.py:reward").startswith("folder.py is a folder")
    _write(tmp_path, "notes.txt", "x = 1\n")
    assert _load_error("./notes.txt:reward").startswith("./notes.txt is not a .py file")


def test_a_file_that_fails_to_import_is_named_with_the_exception_and_line(tmp_path):
    path = _write(tmp_path, "broken.py", "import math\n\nTABLE = 1 / 0\n")
    assert _load_error(f"{path}:reward") == (
        f"importing {path} failed: ZeroDivisionError: division by zero (line 3)"
    )
    path = _write(tmp_path, "syntax.py", "def reward(response, ground_truth)\n    return 1.0\n")
    message = _load_error(f"{path}:reward")
    assert message.startswith(f"importing {path} failed: SyntaxError: ") and "line 1" in message
    path = _write(tmp_path, "missing_dep.py", "import no_such_package_here\n")
    assert _load_error(f"{path}:reward") == (
        f"importing {path} failed: ModuleNotFoundError: No module named 'no_such_package_here' (line 1)"
    )


def test_a_missing_function_lists_the_functions_the_file_has(tmp_path):
    path = _write(
        tmp_path,
        "rewards_a.py",
        """
        from os.path import join

        LIMIT = 3


        def reward(response, ground_truth):
            return 1.0


        def partial(response, ground_truth):
            return 0.5


        def _helper():
            pass
        """,
    )
    # Imported names (join) and private ones are not offered.
    assert _load_error(f"{path}:rewrd") == f"{path} has no function 'rewrd'; it has: partial, reward"
    assert _load_error(f"{path}:LIMIT") == (
        f"{path}:LIMIT is not a function but int 3; it has: partial, reward"
    )
    empty = _write(tmp_path, "empty_rewards.py", "X = 1\n")
    assert (
        _load_error(f"{empty}:reward") == f"{empty} has no function 'reward'; it defines no public function"
    )


def test_a_function_that_cannot_take_response_and_ground_truth_is_refused(tmp_path):
    path = _write(
        tmp_path,
        "shapes.py",
        """
        def one(response):
            return 1.0


        def positional_only(response, ground_truth, extra, /):
            return 1.0


        def with_star(*args, **kwargs):
            return 1.0


        def with_defaults(response, ground_truth, truncated=False, scale=1.0):
            return scale
        """,
    )
    message = _load_error(f"{path}:one")
    assert message == (
        f"{path}:one takes one(response); a reward is called as fn(response, ground_truth, *, truncated, "
        "negative_reward, **row fields) and takes the keywords it names"
    )
    assert "takes positional_only(response, ground_truth, extra, /)" in _load_error(f"{path}:positional_only")
    assert callable(load_spec(f"{path}:with_star")) and callable(load_spec(f"{path}:with_defaults"))


@pytest.mark.parametrize("spec", ["x:1", ":reward", "file.py:", "my-module:reward", "a.b:c-d"])
def test_a_malformed_spec_says_what_is_accepted(spec):
    assert _load_error(spec) == (
        f"{spec!r} is not a reward spec; accepted: a registered name, path/to/file.py:function or "
        "package.module:function"
    )


def test_module_specs_import_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    package = tmp_path / "my_grader_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write(
        package,
        "scoring.py",
        "def score(response, ground_truth):\n    return float(response == ground_truth)\n",
    )
    _write(package, "bad.py", "raise RuntimeError('no config found')\n")
    for name in ("my_grader_pkg", "my_grader_pkg.scoring", "my_grader_pkg.bad"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # Recorded as given: a module is found the same way from wherever the run resumes.
    assert resolve_spec("my_grader_pkg.scoring:score") == "my_grader_pkg.scoring:score"
    assert get_reward("my_grader_pkg.scoring:score") is sys.modules["my_grader_pkg.scoring"].score
    assert _score("my_grader_pkg.scoring:score", ["9", "8"]) == [1.0, 0.0]
    assert _load_error("my_grader_pkg.scoring:nope") == (
        "module my_grader_pkg.scoring has no function 'nope'; it has: score"
    )
    assert _load_error("my_grader_pkg.bad:score") == (
        "importing module my_grader_pkg.bad failed: RuntimeError: no config found"
    )
    assert _load_error("no_such_grader_pkg.x:score") == (
        f"no module named 'no_such_grader_pkg' (neither installed nor under the current directory "
        f"{tmp_path}); accepted: path/to/file.py:function or package.module:function"
    )


def test_a_file_is_imported_once_per_process(tmp_path):
    path = _write(
        tmp_path,
        "counted.py",
        """
        import builtins

        builtins.resrl_test_imports = getattr(builtins, "resrl_test_imports", 0) + 1


        def reward(response, ground_truth):
            return 1.0
        """,
    )
    import builtins

    before = getattr(builtins, "resrl_test_imports", 0)
    load_spec(f"{path}:reward")
    get_batch_reward(f"{path}:reward")
    assert resolve_spec(f"{tmp_path}/sub/../counted.py:reward") == f"{path}:reward"
    assert builtins.resrl_test_imports == before + 1


def test_config_records_a_relative_file_absolute_and_fails_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "graders.py", "def reward(response, ground_truth):\n    return 1.0\n")
    cfg = resolve("tiny", overrides=["algorithm.reward=graders.py:reward"])
    assert cfg.algorithm.reward == f"{tmp_path / 'graders.py'}:reward"
    # The saved config is plain text: nothing to pickle, and it resolves the same from elsewhere.
    saved = json.loads(json.dumps(cfg.to_dict()))
    monkeypatch.chdir(ROOT)
    assert resolve(None, None, [f"algorithm.reward={saved['algorithm']['reward']}"]).algorithm.reward == (
        cfg.algorithm.reward
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config algorithm.reward: graders.py has no function 'rewrd'"):
        resolve("tiny", overrides=["algorithm.reward=graders.py:rewrd"])
    with pytest.raises(
        ConfigError,
        match=r"^config algorithm.reward: 'graders.py' names a file but not its function; accepted: "
        r"graders.py:FUNCTION",
    ):
        resolve("tiny", overrides=["algorithm.reward=graders.py"])
    # A registered name is left to the command line (a Python caller may register it later).
    assert resolve("tiny", overrides=["algorithm.reward=later"]).algorithm.reward == "later"


def test_config_errors_are_one_line_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "algorithm.reward=missing.py:reward"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"resrl: error: config algorithm.reward: file missing.py not found (looked for "
        f"{tmp_path / 'missing.py'}); accepted: path/to/file.py:function or package.module:function"
    ]


# ---------------------------------------------------------------- keywords


def test_only_the_keywords_a_function_names_are_passed():
    seen = []

    def plain(response, ground_truth):
        seen.append(("plain", response, ground_truth))
        return 1.0

    def verl_style(response, ground_truth, data_source, extra_info=None, *, truncated):
        seen.append(("verl", data_source, extra_info, truncated))
        return 0.5

    def everything(response, ground_truth, **kwargs):
        seen.append(("all", kwargs))
        return 0.25

    assert _score(plain, ["a"], rows=[ROW]) == [1.0]
    assert _score(verl_style, ["a"], rows=[ROW]) == [0.5]
    assert _score(everything, ["a"], rows=[ROW], negative_reward=0.0) == [0.25]
    assert seen == [
        ("plain", "a", "9"),
        ("verl", "arithmetic", {"split": "test", "level": 2}, False),
        (
            "all",
            {
                "extra_info": {"split": "test", "level": 2},
                "ability": "math",
                "data_source": "arithmetic",
                "prompt": "Q: (3+4)*2-5\n",
                "solution": ROW.solution,
                "truncated": False,
                "negative_reward": 0.0,
            },
        ),
    ]


def test_a_row_field_never_replaces_the_call_arguments():
    def everything(response, ground_truth, **kwargs):
        return float(kwargs["truncated"]) + kwargs["negative_reward"] + float(response == "a")

    row = {"data_source": "x", "truncated": True, "negative_reward": 5.0, "response": "b"}
    assert _score(everything, ["a"], rows=[row], negative_reward=-1.0) == [0.0]


def test_a_truncated_response_gets_the_negative_reward_unless_the_function_takes_truncated():
    calls = []

    def blind(response, ground_truth):
        calls.append(response)
        return 1.0

    def aware(response, ground_truth, *, truncated):
        return 0.5 if truncated else 1.0

    assert _score(blind, ["a", "b"], truncated=[True, False]) == [-1.0, 1.0]
    assert calls == ["b"]
    assert _score(aware, ["a", "b"], truncated=[True, False]) == [0.5, 1.0]


def test_a_keyword_the_row_lacks_fails_with_the_row():
    def needs_level(response, ground_truth, *, level):
        return 1.0

    with pytest.raises(RewardError) as info:
        _score(needs_level, ["Answer: 3"], rows=[ROW])
    assert str(info.value) == (
        f"reward test-needs_level-{id(needs_level)} needs the keyword level, which row index 7 "
        "(data_source 'arithmetic', prompt 'Q: (3+4)*2-5\\n', answer '9'), response 0 of the batch "
        "'Answer: 3' does not have; given: extra_info, ability, data_source, prompt, solution, truncated, "
        "negative_reward"
    )


def test_each_distinct_response_and_row_is_scored_once():
    calls = []

    def counted(response, ground_truth, *, data_source):
        calls.append((response, data_source))
        return 1.0

    other = Example(prompt="Q: 1+1\n", answer="9", data_source="other")
    out = _score(counted, ["a", "a", "b", "a"], rows=[ROW, ROW, ROW, other])
    assert out == [1.0] * 4
    assert calls == [("a", "arithmetic"), ("b", "arithmetic"), ("a", "other")]


def test_score_responses_gives_each_response_its_prompts_row():
    def by_source(response, ground_truth, *, data_source, negative_reward):
        return 1.0 if data_source == "arithmetic" else negative_reward

    register_reward("by-source")(by_source)

    class Algo:
        negative_reward, length_reward = -1.0, False

    def sample(text):
        return Sample([1], [2, 3], [-0.1, -0.1], False, text)

    other = Example(prompt="Q", answer="1", data_source="other")
    samples = [[sample("x"), sample("y")], [sample("x"), sample("z")]]
    rewards, positive, _ = score_responses(
        samples, ["9", "1"], get_batch_reward("by-source"), Algo, rows=[ROW, other]
    )
    assert rewards == [1.0, 1.0, -1.0, -1.0] and positive == [True, True, False, False]
    with pytest.raises(ValueError, match="one row per prompt"):
        score_responses(samples, ["9", "1"], get_batch_reward("by-source"), Algo, rows=[ROW])


def test_row_fields_are_read_from_data_files_and_written_back(tmp_path):
    rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": "1+1?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "2"},
            "extra_info": {"split": "train", "index": 7},
        },
        {"problem": "2*3?", "answer": "6", "solution": "2*3=6", "difficulty": 1},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    verl, plain = load_examples(path)
    assert verl.reward_fields() == {
        "ability": "math",
        "extra_info": {"split": "train", "index": 7},
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": "1+1?"}],
        "solution": None,
    }
    assert plain.reward_fields() == {
        "problem": "2*3?",
        "difficulty": 1,
        "data_source": "unknown",
        "prompt": "2*3?",
        "solution": "2*3=6",
    }
    again = load_examples(write_examples([verl, plain], tmp_path / "again.jsonl"))
    assert [e.reward_fields() for e in again] == [verl.reward_fields(), plain.reward_fields()]


# ---------------------------------------------------------------- errors on the first batch


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("1.0", "str '1.0'", id="str"),
        pytest.param(None, "NoneType None", id="none"),
        pytest.param(True, "bool True", id="bool"),
        pytest.param(math.nan, "float nan", id="nan"),
        pytest.param([1.0], "list [1.0]", id="list"),
        pytest.param(10**400, "int " + str(10**400)[:60] + "...", id="int-beyond-float"),
    ],
)
def test_a_return_value_that_is_not_a_finite_number_is_refused(value, shown):
    def returns(response, ground_truth):
        return value

    with pytest.raises(RewardError) as info:
        _score(returns, ["Answer: 3"], rows=[ROW])
    assert str(info.value) == (
        f"reward test-returns-{id(returns)} returned {shown} for row index 7 (data_source 'arithmetic', "
        "prompt 'Q: (3+4)*2-5\\n', answer '9'), response 0 of the batch 'Answer: 3'; accepted: a finite "
        "int or float (> 0: correct)"
    )


def test_numbers_of_any_real_type_are_accepted():
    import numpy as np

    def numpy_value(response, ground_truth):
        return np.float32(0.5) if response == "a" else np.int64(-1)

    assert _score(numpy_value, ["a", "b"]) == [0.5, -1.0]


def test_an_exception_inside_names_the_row_with_long_texts_cut():
    long_prompt = "Q: " + "1+" * 80 + "1\n"
    row = Example(prompt=[{"role": "user", "content": long_prompt}], answer="81", data_source="long", index=3)

    def fails(response, ground_truth, *, data_source):
        return 1.0 / (len(response) - len(response))

    with pytest.raises(RewardError) as info:
        _score(fails, ["ok", "x" * 100], rows=[row, row], answers=["81", "81"])
    message = str(info.value)
    assert message == (
        f"reward test-fails-{id(fails)} raised ZeroDivisionError: float division by zero on row index 3 "
        f"(data_source 'long', prompt {long_prompt[:60] + '...'!r}, answer '81'), response 0 of the batch 'ok'"
    )
    assert isinstance(info.value, UserError) and isinstance(info.value.__cause__, ZeroDivisionError)


def test_an_error_inside_a_loaded_file_names_the_spec(tmp_path):
    path = _write(
        tmp_path,
        "raising.py",
        """
        def reward(response, ground_truth):
            raise KeyError("level")
        """,
    )
    with pytest.raises(
        RewardError, match=rf"^reward {path}:reward raised KeyError: 'level' on row \(answer '9'\)"
    ):
        _score(f"{path}:reward", ["a"])


# ---------------------------------------------------------------- the example file


def test_example_reward_gives_partial_credit_below_zero():
    reward = load_spec(str(ROOT / EXAMPLE_SPEC))
    fields = {"data_source": "arithmetic", "solution": ROW.solution}
    right = "3+4=7\n7*2=14\n14-5=9\nAnswer: 9"
    two_steps = "3+4=7\n7*2=14\n14-5=8\nAnswer: 8"
    for negative in (-1.0, 0.0):
        kw = {"truncated": False, "negative_reward": negative, **fields}
        assert reward(right, "9", **kw) == 1.0
        assert reward(right, "9", **{**kw, "truncated": True}) == negative
        assert reward("Answer: 8", "9", **kw) == negative
        assert reward("junk", "9", **kw) == negative
        # Two of three reference steps: a third of the penalty spared; in evaluation still 0.
        assert reward(two_steps, "9", **kw) == pytest.approx(negative * (1 - 0.5 * 2 / 3))
    other = {"truncated": False, "negative_reward": -1.0, "data_source": "gsm8k"}
    # Numbers that the verifier compares exactly (no math-verify process is started).
    assert reward("so \\boxed{\\frac{1}{2}}", "0.5", **other) == 1.0
    assert reward("Answer: 3", "1/2", **other) == -1.0


# ---------------------------------------------------------------- the command line, end to end

TINY = [
    "--preset",
    "tiny",
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "run.name=run",
]
RECORDER = """
import json
from pathlib import Path

LOG = Path(__file__).with_name("calls.jsonl")


def reward(response, ground_truth, *, negative_reward, data_source, extra_info=None, **fields):
    call = {"ground_truth": ground_truth, "negative_reward": negative_reward, "data_source": data_source,
            "extra_info": extra_info, "fields": sorted(fields)}
    with LOG.open("a") as f:
        f.write(json.dumps(call) + "\\n")
    return 1.0 if response.strip().endswith(ground_truth) else negative_reward
"""


def _resrl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "resrl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    return calls


def test_the_example_reward_trains_from_the_command_line(tmp_path):
    done = _resrl(
        ROOT,
        "train",
        *TINY,
        "eval.before=false",
        f"run.out_dir={tmp_path}",
        f"algorithm.reward={EXAMPLE_SPEC}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert json.loads((run / "config.json").read_text())["algorithm"]["reward"] == f"{ROOT / EXAMPLE_SPEC}"
    rewards = [json.loads(line)["reward/mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 2 and all(-1.0 <= r <= 1.0 for r in rewards)


def test_row_fields_reach_the_reward_in_training_resume_and_eval(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    _write(work, "recorder.py", RECORDER)
    data = [
        {
            "problem": f"{a}+{a}",
            "answer": str(2 * a),
            "solution": f"{a}+{a}={2 * a}\nAnswer: {2 * a}",
            "data_source": "doubles",
            "extra_info": {"a": a},
        }
        for a in range(1, 40)
    ]
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in data))
    files = [f"data.train_files={rows}", f"data.eval_files={rows}", f"run.out_dir={work / 'runs'}"]
    done = _resrl(work, "train", *TINY, "eval.before=false", *files, "algorithm.reward=recorder.py:reward")
    assert done.returncode == 0, done.stderr[-3000:]
    calls = _calls(work)
    assert {c["negative_reward"] for c in calls} == {-1.0, 0.0}
    assert {c["data_source"] for c in calls} == {"doubles"}
    # Each response's own row: its extra_info belongs to its ground truth.
    assert all(2 * c["extra_info"]["a"] == int(c["ground_truth"]) for c in calls)
    assert {tuple(c["fields"]) for c in calls} == {("problem", "prompt", "solution", "truncated")}
    # The saved config names the file absolutely: the run resumes from another directory.
    config = work / "runs" / "run" / "config.json"
    done = _resrl(elsewhere, "train", "--config", str(config), "train.steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((work / "runs" / "run" / "summary.json").read_text())["steps"] == 3
    assert {c["data_source"] for c in _calls(work)} == {"doubles"}
    # `resrl eval` loads the spec the same way and passes the row's fields.
    done = _resrl(
        work, "eval", "--model", "runs/run/final", "--data", "rows.jsonl", "--reward", "recorder.py:reward",
        "--n", "2", "--max-problems", "3", "--max-new-tokens", "8", "--device", "cpu", "--out", "ev",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    calls = _calls(work)
    assert {c["negative_reward"] for c in calls} == {0.0}
    assert sorted({c["extra_info"]["a"] for c in calls}) == [1, 2, 3]


def test_compare_uses_the_users_reward_in_every_run(tmp_path):
    _write(tmp_path, "recorder.py", RECORDER)
    done = _resrl(
        tmp_path, "compare", *TINY, f"run.out_dir={tmp_path / 'runs'}", "algorithm.reward=recorder.py:reward",
        "--variants", "grpo,psr", "--seeds", "0", "--name", "cmp",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    calls = _calls(tmp_path)
    assert {c["data_source"] for c in calls} == {"arithmetic"}
    assert {c["negative_reward"] for c in calls} == {-1.0, 0.0}
    saved = [
        json.loads((tmp_path / "runs" / "cmp" / f"{v}-s0" / "config.json").read_text())
        for v in ("grpo", "psr")
    ]
    assert {s["algorithm"]["reward"] for s in saved} == {f"{tmp_path / 'recorder.py'}:reward"}


def test_a_bad_return_value_stops_training_at_the_first_batch_in_one_line(tmp_path):
    _write(tmp_path, "wrong.py", "def reward(response, ground_truth):\n    return str(len(response))\n")
    done = _resrl(
        tmp_path,
        "train",
        *TINY,
        "eval.before=false",
        f"run.out_dir={tmp_path / 'runs'}",
        "algorithm.reward=wrong.py:reward",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"resrl: error: reward {tmp_path / 'wrong.py'}:reward returned str ")
    assert "for row index " in lines[0] and "(data_source 'arithmetic', prompt 'Q: " in lines[0]
    assert lines[0].endswith("; accepted: a finite int or float (> 0: correct)")
    # No step was taken.
    metrics = tmp_path / "runs" / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
