"""bench/bench_step.py on a tiny model (CPU): both paths run the trainer's step on the same
weights and batch, so they must agree on losses, gradient norm and ResRL weights; the GPU figures
come from the same script."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_step  # noqa: E402

TINY = ["--model", "tiny", "--device", "cpu", "--prompts", "4", "--n", "4", "--prompt-len", "12",
        "--response-len", "24", "--micro-batch-tokens", "200", "--steps", "2"]  # fmt: skip


def _run(path, *extra):
    return bench_step.run_path(bench_step.parse_args([*TINY, *extra, "--path", path]))


@pytest.mark.parametrize("offload", [False, True])
def test_resrl_and_reference_paths_compute_the_same_step(offload, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    extra = ["--offload"] if offload else []
    try:
        ours, ref = _run("resrl", *extra), _run("reference", *extra)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert ours["status"] == ref["status"] == "ok"
    a, b = ours["metrics"], ref["metrics"]
    assert a["resrl/neg_tokens"] > 0 and a["optim/grad_norm"] > 0
    for key in ("loss/pg", "loss/entropy", "optim/grad_norm", "resrl/neg_weight_mean", "resrl/distance_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for phase in bench_step.PHASES:
        assert a[f"throughput/{phase}_tokens_per_s"] > 0


def test_main_runs_each_path_in_a_subprocess_and_prints_the_table(capsys):
    rows = bench_step.main([*TINY, "--paths", "resrl,reference"])
    assert [r["path"] for r in rows] == ["resrl", "reference"]
    assert all(r["status"] == "ok" and r["device"] for r in rows)
    out = capsys.readouterr().out
    assert "reference  update" in out and "tokens/s" in out
    with pytest.raises(SystemExit):
        bench_step.main([*TINY, "--paths", "resrl,logits"])


def test_a_path_that_dies_becomes_a_row_that_says_so(monkeypatch, capsys):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "bogus")  # the child's first kernel call raises
    (row,) = bench_step.main([*TINY, "--paths", "resrl"])
    assert row["status"] == "failed (exit 1)" and "RESRL_KERNEL_IMPL='bogus'" in row["error"]
    assert "FAILED (EXIT 1)" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_paths_agree_in_bf16_and_report_memory(monkeypatch):
    """On a GPU (bf16 compute, fp32 masters through FSDP2 with offload, Triton kernels) the two
    paths compute the same step to bf16 precision, and each phase reports its peak memory."""
    import torch.distributed as dist

    args = [a if a != "cpu" else "cuda" for a in TINY] + ["--offload"]
    try:
        ours = bench_step.run_path(bench_step.parse_args([*args, "--path", "resrl"]))
        ref = bench_step.run_path(bench_step.parse_args([*args, "--path", "reference"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert ours["status"] == ref["status"] == "ok"
    a, b = ours["metrics"], ref["metrics"]
    for key in ("loss/pg", "loss/entropy", "optim/grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=3e-2, abs=1e-4), key
    for phase in bench_step.PHASES:
        assert a[f"memory/{phase}_peak_gib"] > 0
