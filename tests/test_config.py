"""Config: presets, files, dotted overrides, validation errors, and the CLI's config/help output."""

import json

import pytest

from resrl.cli import main
from resrl.config import Config, ConfigError, apply_overrides, resolve
from resrl.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name):
    cfg = resolve(name)
    assert isinstance(cfg, Config)


def test_paper_recipe_values():
    cfg = resolve("qwen3-4b-math-resrl")
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.train.mini_batch_prompts) == (256, 4, 64)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-6, 10, 0.1)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (2048, 4096)
    assert (cfg.rollout.temperature, cfg.eval.temperature) == (1.0, 0.6)
    assert cfg.algorithm.objective == "resrl" and cfg.algorithm.pos_scale == 0.1


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'; available: tiny"):
        resolve("nope")


def test_overrides_are_typed():
    cfg = resolve(
        "tiny",
        overrides=[
            "optim.lr=3e-5",
            "train.steps=7",
            "run.tensorboard=false",
            "algorithm.dual_clip=null",
            "run.name=1e3",
            "data.train_files=a.jsonl,b.parquet",
            "model.path=null",
            "algorithm.eps_high=1",
        ],
    )
    assert cfg.optim.lr == 3e-5 and cfg.train.steps == 7 and cfg.run.tensorboard is False
    assert cfg.algorithm.dual_clip is None and cfg.run.name == "1e3"
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"] and cfg.model.path is None
    assert isinstance(cfg.algorithm.eps_high, float) and cfg.algorithm.eps_high == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"optim.lrr: unknown field; fields of optim: beta1, beta2"),
        ("optimizer.lr=1", r"section one of model, data, rollout"),
        ("optim.lr", r"expected section.field=value"),
        ("optim.lr=fast", r"optim.lr: expected a number, got 'fast'"),
        ("train.steps=2.5", r"train.steps: expected an integer, got 2.5"),
        ("run.tensorboard=maybe", r"run.tensorboard: expected true or false"),
        ("rollout.n=0", r"rollout.n: must be >= 1, got 0"),
        ("algorithm.objective=ppo", r"algorithm.objective: 'ppo' is not supported; accepted: grpo, psr, nsr"),
        ("algorithm.agg=mean", r"accepted: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        ("rollout.temperature=0", r"training rollouts need temperature > 0"),
        ("train.mini_batch_prompts=5", r"5 must divide train.prompts_per_step \(32\)"),
        ("algorithm.q_low=0.9", r"need 0 <= q_low < q_high <= 1"),
        ("model.head_dim=16", r"model.head_dim: must be >= 32"),
        ("run.device=tpu", r"accepted: auto, cpu, cuda, cuda:N"),
        ("run.name=a/b", r"run.name: must be a plain folder name"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("tiny", overrides=[override])


def test_file_layers_between_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2.0e-5\ntrain:\n  steps: 9\n")
    cfg = resolve("tiny", path, ["train.steps=11"])
    assert cfg.optim.lr == 2e-5 and cfg.train.steps == 11
    assert cfg.model.hidden_size == PRESETS["tiny"]["model"]["hidden_size"]
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps({"rollout": {"n": 3}}))
    assert resolve(None, jpath).rollout.n == 3


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve(None, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'optim' must be a mapping"):
        resolve(None, bad)
    bad.write_text("nope:\n  x: 1\n")
    with pytest.raises(ConfigError, match="config section 'nope' is unknown"):
        resolve(None, bad)


def test_round_trip_through_dict():
    cfg = resolve("tiny", overrides=["algorithm.objective=nsr"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_apply_overrides_on_empty():
    assert apply_overrides({}, ["sft.steps=3"]) == {"sft": {"steps": 3}}


def test_cli_config_prints_yaml(capsys):
    assert main(["config", "--preset", "tiny", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "steps: 4" in out and "objective: resrl" in out


def test_cli_reports_config_errors(capsys):
    assert main(["config", "--preset", "tiny", "rollout.n=-1"]) == 2
    assert "rollout.n: must be >= 1" in capsys.readouterr().err


def test_cli_train_help_lists_documented_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "algorithm.objective = 'resrl'" in out
    assert "Per-token advantage: grpo, psr, nsr, w_reinforce, resrl (docs/ALGORITHMS.md §3) or ace" in out
