"""16-bit compute trains fp32 master weights, in every mode, through the CLI.

With `model.dtype=bfloat16` (what `auto` means on CUDA) the trainer runs FSDP2 with bf16 compute and
fp32 gradient reduction in one process, with CPU offload and under torchrun, and AdamW steps fp32
master weights: at the paper recipe's lr 1e-6 a step must move nearly every weight (stepping bf16
weights moved 2% of them). Each mode also starts RL with no warm start (FSDP2's root was once
initialized by the warm start only) and resumes from its checkpoint; the export is in the run's
compute dtype. The CPU takes exactly the path a GPU would, with bf16 tensors.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from small import SMALL_RUN
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from resrl.config import resolve
from resrl.loading import load_model, load_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "eval.before=false",
    "run.device=cpu",
    "run.name=run",
    "sft.steps=0",
    "optim.lr=1e-6",
    "optim.warmup_steps=0",
    "run.checkpoint_every=1",
    # A random model answers nothing right: NSR's negatives still give every step a gradient.
    "algorithm.objective=nsr",
]
MODES = {
    "one-process": ([sys.executable, "-m", "resrl"], []),
    "offload": ([sys.executable, "-m", "resrl"], ["train.cpu_offload=true"]),
    "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "resrl"], []),
}


def _train(launcher: list[str], out, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "train", "--preset", "tiny", *ARGS, f"run.out_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)


def _masters(checkpoint_dir, tmp_path) -> dict[str, torch.Tensor]:
    """The policy weights a checkpoint holds (what AdamW steps), as one process sees them."""
    target = tmp_path / "masters.pt"
    dcp_to_torch_save(checkpoint_dir / "shards", target)
    state = torch.load(target, weights_only=True)["model"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_compute_steps_fp32_masters_starts_without_warm_start_and_resumes(tmp_path, mode):
    launcher, extra = MODES[mode]
    overrides = ["model.dtype=bfloat16", *extra]
    first = _train(launcher, tmp_path, "train.steps=1", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]

    # The starting weights: the model is built from the run seed, as the trainer built it.
    cfg = resolve("tiny", overrides=[*ARGS, f"run.out_dir={tmp_path}", *overrides])
    tokenizer, _, _ = load_task(cfg)
    start = load_model(cfg, tokenizer, torch.device("cpu"), dtype=torch.float32).state_dict()
    after = _masters(tmp_path / "run" / "checkpoints" / "step_000001", tmp_path)
    layers = [k for k in start if ".layers." in k]
    assert layers and all(after[k].dtype == torch.float32 for k in layers)
    moved = sum(int((after[k] != start[k]).sum()) for k in layers)
    total = sum(start[k].numel() for k in layers)
    # Adam's first step moves every weight with a gradient by ~lr; in bf16 ~2% would move.
    assert moved / total > 0.9, f"only {moved / total:.1%} of the decoder weights moved at lr 1e-6"

    # The export is in the compute dtype, and says so.
    final = tmp_path / "run" / "final"
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"

    # Resume (the root is initialized before anything runs through the blocks) and go on.
    second = _train(launcher, tmp_path, "train.steps=2", *overrides)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 1" in second.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_fp32_run_exports_fp32(tmp_path):
    """model.dtype=float32 (auto on the CPU): no FSDP2, fp32 weights stepped and written."""
    launcher, _ = MODES["one-process"]
    result = _train(launcher, tmp_path, "train.steps=1", "model.dtype=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
