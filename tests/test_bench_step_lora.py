"""bench/bench_step.py --lora-rank on the tiny model (CPU): the same measured step with LoRA adapters
(`model.lora_rank`, `resrl.lora`), rows that say which run they are, and an optimizer that steps
the adapters only."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_step  # noqa: E402

TINY = ["--model", "tiny", "--device", "cpu", "--prompts", "4", "--n", "4", "--prompt-len", "12",
        "--response-len", "24", "--micro-batch-tokens", "200", "--steps", "2"]  # fmt: skip
# The tiny model's adapters of rank 8: r x (in + out) of q (64 -> 64), k and v (64 -> 32), o, gate
# and up (64 -> 128), down (128 -> 64), in each of its 2 blocks.
ADAPTER_PARAMS = 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


def _run(path, *extra):
    return bench_step.run_path(bench_step.parse_args([*TINY, *extra, "--path", path]))


def test_lora_step_trains_the_adapters_only(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    full, lora = _run("resrl"), _run("resrl", "--lora-rank", "8")
    assert full["status"] == lora["status"] == "ok"
    assert (full["lora_rank"], lora["lora_rank"]) == (0, 8)
    assert full["frozen_params"] == 0 and lora["frozen_params"] == full["trained_params"]
    assert lora["trained_params"] == ADAPTER_PARAMS < full["trained_params"] / 4
    # torch's AdamW: two fp32 moments and a 0-d step per trained tensor (14 adapters per block).
    assert full["optim"] == lora["optim"] == "adamw"
    assert lora["optimizer_state_bytes"] == 8 * ADAPTER_PARAMS + 4 * 14 * 2
    assert lora["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 4
    a = lora["metrics"]
    assert a["optim/grad_norm"] > 0 and a["resrl/neg_tokens"] > 0
    for phase in bench_step.PHASES:
        assert a[f"throughput/{phase}_tokens_per_s"] > 0


def test_recorded_rows_carry_the_lora_rank(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RESRL_RESULTS_DIR", str(tmp_path))
    (row,) = bench_step.main([*TINY, "--paths", "resrl", "--lora-rank", "8", "--record"])
    assert row["status"] == "ok" and row["lora_rank"] == 8
    assert row["trained_params"] == ADAPTER_PARAMS
    (recorded,) = [json.loads(line) for line in (tmp_path / "step.jsonl").read_text().splitlines()]
    assert recorded["lora_rank"] == 8 and recorded["path"] == "resrl"
    assert "LoRA rank 8" in capsys.readouterr().out


def test_lora_rank_must_not_be_negative():
    with pytest.raises(SystemExit):
        bench_step.parse_args([*TINY, "--lora-rank", "-1"])
    assert bench_step.parse_args(TINY).lora_rank == 0
