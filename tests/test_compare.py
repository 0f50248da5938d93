"""`resrl compare` and `resrl eval` end to end on a very small model."""

import json

import pytest
from small import SMALL_RUN

from resrl.cli import main
from resrl.compare import run_comparison
from resrl.tasks import write_dataset

SMALL = [*SMALL_RUN, "eval.n=4"]


def test_comparison_shares_the_warm_start_and_writes_table_and_plot(tmp_path):
    report = run_comparison(
        "tiny", None, [*SMALL, f"run.out_dir={tmp_path}"], variants=["grpo", "resrl", "nsr"], seeds=[0, 1]
    )
    root = tmp_path / "compare"
    assert set(report) == {"start", "grpo", "resrl", "nsr"}
    assert {"pass@1", "pass@4", "avg@4", "maj@4"} <= set(report["grpo"])
    runs = json.loads((root / "compare.json").read_text())["runs"]
    for seed in ("0", "1"):
        befores = [runs[v][seed]["eval_before"] for v in ("grpo", "resrl", "nsr")]
        # Every variant of a seed starts from the same exported warm start and the same eval seed.
        assert befores[0] == befores[1] == befores[2]
    table = (root / "compare.md").read_text()
    assert "| resrl | " in table and "mean ± std over seeds [0, 1]" in table
    assert (root / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun reuses finished runs instead of training again.
    stamp = (root / "grpo-s0" / "summary.json").stat().st_mtime_ns
    run_comparison("tiny", None, [*SMALL, f"run.out_dir={tmp_path}"], variants=["grpo"], seeds=[0])
    assert (root / "grpo-s0" / "summary.json").stat().st_mtime_ns == stamp


def test_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'ppo'; available: grpo, psr.*resrl-lora8"):
        run_comparison("tiny", None, [f"run.out_dir={tmp_path}"], variants=["ppo"], seeds=[0])
    for bad in ("grpo-lora0", "grpo-lora", "ppo-lora8", "grpo-lorax"):
        with pytest.raises(ValueError, match=f"unknown variant '{bad}'"):
            run_comparison("tiny", None, [f"run.out_dir={tmp_path}"], variants=[bad], seeds=[0])


def test_lora_variants_share_the_warm_start_with_their_own_lr(tmp_path, capsys):
    """`<variant>-lora<R>` trains adapters of rank R on the shared warm start; `--set` gives one
    variant its own learning rate; `--warm-starts` reuses another comparison's warm starts."""
    out = f"run.out_dir={tmp_path}"
    args = ["compare", "--preset", "tiny", *SMALL, out, "--seeds", "0", "--variants", "grpo,grpo-lora4"]
    assert main([*args, "--set", "grpo-lora4:optim.lr=3e-3"]) == 0
    root = tmp_path / "compare"
    full = json.loads((root / "grpo-s0" / "config.json").read_text())
    lora = json.loads((root / "grpo-lora4-s0" / "config.json").read_text())
    assert full["model"]["lora_rank"] == 0 and lora["model"]["lora_rank"] == 4
    assert lora["optim"]["lr"] == 3e-3 and full["optim"]["lr"] == 3e-4
    assert lora["model"]["path"] == full["model"]["path"] == str(root / "warm_start-s0")
    assert (root / "grpo-lora4-s0" / "final_adapter" / "adapter_config.json").is_file()
    runs = json.loads((root / "compare.json").read_text())["runs"]
    assert runs["grpo"]["0"]["eval_before"] == runs["grpo-lora4"]["0"]["eval_before"]
    assert "| grpo-lora4 | " in capsys.readouterr().out
    # A second comparison on the first one's warm start makes none of its own.
    assert main([*args[:-1], "grpo-lora2", "--name", "again", "--warm-starts", str(root)]) == 0
    assert not (tmp_path / "again" / "warm_start-s0").exists()
    again = json.loads((tmp_path / "again" / "grpo-lora2-s0" / "config.json").read_text())
    assert again["model"]["path"] == str(root / "warm_start-s0")
    # Mistakes are one line, before any work.
    for extra, message in (
        (["--set", "resrl:optim.lr=1"], "variant 'resrl' is not among --variants"),
        (["--set", "grpo-lora4"], "expected VARIANT:key=value"),
        (["--set", "grpo-lora4:optim.lr=-1"], "optim.lr"),
        (
            ["--set", "grpo-lora4:run.seed=3"],
            "the comparison sets run.seed itself for every run (from --seeds)",
        ),
    ):
        assert main([*args, "--name", "bad", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "warm_start-s0").exists()


def test_eval_cli_on_a_trained_run(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", *SMALL, f"run.out_dir={tmp_path}", "run.name=r"]) == 0
    data = write_dataset(tmp_path / "held.jsonl", 5, seed=9)
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tmp_path / "r" / "final"), "--data", str(data), "--n", "4"]
    assert main([*args, "--max-new-tokens", "24", "--out", str(out), "--plot"]) == 0
    summary = json.loads((out / "final_summary.json").read_text())
    assert summary["n_problems"] == 5 and {"pass@1", "pass@2", "pass@4", "avg@4"} <= set(summary)
    assert summary["model"] == str((tmp_path / "r" / "final").resolve())
    assert len((out / "final_samples.jsonl").read_text().splitlines()) == 5
    assert (out / "final_pass_at_k.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "not a complete Hugging Face model folder, missing the config, weights and tokenizer" in err
    # The tiny model has 128 positions: a cap that does not fit is refused before sampling.
    assert main([*args, "--max-new-tokens", "1024"]) == 2
    assert "the model has 128 (max_position_embeddings)" in capsys.readouterr().err


def test_readme_eval_command_on_what_make_demo_writes(tmp_path, capsys):
    """README "Evaluation": export the held-out split, then `resrl eval` the run's final/ folder with
    the default response cap (it must fit the tiny model's 128 positions)."""
    run = [*SMALL, f"run.out_dir={tmp_path}", "run.name=tiny"]
    assert main(["train", "--preset", "tiny", *run]) == 0
    held_out = tmp_path / "tiny" / "held_out.jsonl"
    assert main(["data", "export", "--preset", "tiny", *run, "--out", str(held_out)]) == 0
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    after = json.loads((tmp_path / "tiny" / "eval" / "after_samples.jsonl").read_text().splitlines()[0])
    # Exactly the problems training evaluated, in order.
    assert len(rows) == 6 and rows[0]["prompt"] == after["prompt"] and rows[0]["answer"] == after["answer"]
    final = str(tmp_path / "tiny" / "final")
    assert main(["eval", "--model", final, "--data", str(held_out), "--n", "2", "--temperature", "0.6"]) == 0
    summary = json.loads((tmp_path / "tiny" / "eval" / "final_summary.json").read_text())
    assert summary["n_problems"] == 6 and "pass@2" in summary
    assert summary["mean_response_length"] <= 128 - 1


def test_plot_cli_overlays_runs(tmp_path, capsys):
    summary = {"eval_before": {"pass@1": 0.2, "pass@2": 0.3}, "eval_after": {"pass@1": 0.4, "pass@2": 0.5}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    out = tmp_path / "c.png"
    assert main(["plot", f"base={path}:eval_before", f"rl={path}:eval_after", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", f"{path}:eval_middle", "--out", str(out)]) == 2
    assert "no metrics object under 'eval_middle'" in capsys.readouterr().err
