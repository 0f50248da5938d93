"""FSDP2 across two gloo processes (torchrun) against one process: gradients, parameters, loss,
checkpoints saved at two processes and resumed at one, clean shutdown, and `resrl train` itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
LR = 1e-2


def run(nproc, out, *args, module=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    target = ["-m", module] if module else [str(WORKER)]
    if nproc == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *target, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def result(out):
    return (
        json.loads((out / "result.json").read_text())["metrics"],
        torch.load(out / "grads.pt"),
        load_file(out / "exported" / "model.safetensors"),
    )


def assert_grads_close(a, b, rel):
    assert a.keys() == b.keys()
    for name in a:
        err = ((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-12)).item()
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


def assert_params_after_adam_close(a, b):
    # Adam's first step moves each weight by about lr * sign(grad): where a gradient is ~0 the two
    # runs may step in opposite directions, so weights agree to 2 lr, not to rounding.
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2.1 * LR, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for nproc in (1, 2):
        for objective in ("grpo", "resrl"):
            out[nproc, objective] = root / f"{objective}-{nproc}"
            run(nproc, out[nproc, objective], str(out[nproc, objective]), f"algorithm.objective={objective}")
    out[2, "kl"] = root / "kl-2"
    run(2, out[2, "kl"], str(out[2, "kl"]), *KL)
    # ResRL weights inside the update's forward: micro-batches hold whole groups (2 of 4 each),
    # padded and packed; the pre-pass path of the same layout as the oracle.
    for name, args in {**INLINE, **R2PO}.items():
        for nproc in (1, 2) if name != "padded-prepass" else (1,):
            out[nproc, name] = root / f"{name}-{nproc}"
            run(nproc, out[nproc, name], str(out[nproc, name]), "algorithm.objective=resrl", *args)
    return out


# R²PO: step 0 trains the head (stage A: only W1, W2 get gradients), or with head_steps=0 the
# policy on π_roll's samples (stage B), the head a separate FSDP2 unit in both.
R2PO = {
    "r2po-head": ["r2po.enabled=true", "r2po.head_init_std=0.05", "r2po.head_kl_coef=0.1"],
    "r2po-policy": ["r2po.enabled=true", "r2po.head_init_std=0.05", "r2po.head_steps=0"],
}
INLINE = {
    "padded": ["train.micro_batch_size=8"],
    "packed": ["train.pack=true", "train.max_tokens_per_micro_batch=120"],
    "padded-prepass": ["train.micro_batch_size=8", "algorithm.resrl_weights=prepass"],
}


# NSR moves the policy whatever the rewards; the KL term then pulls it back to the reference.
KL = ["algorithm.objective=nsr", "algorithm.kl_coef=0.5"]


def test_two_processes_match_one_grpo(runs):
    m1, g1, p1 = result(runs[1, "grpo"])
    m2, g2, p2 = result(runs[2, "grpo"])
    assert m2["loss/pg"] == pytest.approx(m1["loss/pg"], rel=1e-5)
    assert m2["optim/grad_norm"] == pytest.approx(m1["optim/grad_norm"], rel=1e-5)
    assert_grads_close(g1, g2, rel=1e-5)
    assert_params_after_adam_close(p1, p2)


def test_groups_are_balanced_over_ranks_by_tokens(runs):
    m1, _, _ = result(runs[1, "grpo"])
    m2, _, _ = result(runs[2, "grpo"])
    assert m1["batch/rank_token_imbalance"] == 1.0
    # Two groups per rank out of four of different lengths: the greedy split is within 10%.
    assert 1.0 <= m2["batch/rank_token_imbalance"] < 1.1


def test_kl_reference_sharded_saved_at_two_resumed_at_one_and_two(runs, tmp_path):
    ckpt = runs[2, "kl"] / "run" / "checkpoints" / "step_000001"
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, one, str(one), "--resume", str(ckpt), *KL)
    run(2, two, str(two), "--resume", str(ckpt), *KL)
    m1, g1, _ = result(one)
    m2, g2, _ = result(two)
    # The restored reference differs from the restored policy: the KL term is live.
    assert m1["loss/kl"] > 0
    assert m2["loss/kl"] == pytest.approx(m1["loss/kl"], rel=1e-5)
    assert_grads_close(g1, g2, rel=1e-5)


def test_two_processes_match_one_resrl(runs):
    # Each rank builds the ResRL weights of its own groups; they must be those of one process.
    m1, g1, _ = result(runs[1, "resrl"])
    m2, g2, _ = result(runs[2, "resrl"])
    assert m2["loss/pg"] == pytest.approx(m1["loss/pg"], rel=1e-5)
    # Step metrics are those of the whole step, whatever the process count.
    for key in ("resrl/groups_mixed", "resrl/neg_tokens", "resrl/neg_weight_mean", "loss/entropy"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4), key
    assert_grads_close(g1, g2, rel=1e-4)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_two_processes_match_one_with_weights_in_the_update(runs, layout):
    m1, g1, _ = result(runs[1, layout])
    m2, g2, _ = result(runs[2, layout])
    # Every group was weighed in the update's forward, on each rank for its own groups.
    assert m1["resrl/groups_in_update"] == m2["resrl/groups_in_update"] == 4
    assert m1["resrl/groups_in_prepass"] == m2["resrl/groups_in_prepass"] == 0
    for key in ("resrl/neg_tokens", "resrl/neg_weight_mean", "resrl/distance_mean", "loss/pg"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4), key
    assert_grads_close(g1, g2, rel=1e-4)


@pytest.mark.parametrize("stage", ["head", "policy"])
def test_two_processes_match_one_r2po(runs, stage):
    m1, g1, w1 = result(runs[1, f"r2po-{stage}"])
    m2, g2, w2 = result(runs[2, f"r2po-{stage}"])
    assert m1["r2po/stage"] == m2["r2po/stage"] == (0.0 if stage == "head" else 1.0)
    trained = {n for n in g1 if n.startswith("rollout_head.")}
    assert trained == (
        {"rollout_head.layer1.weight", "rollout_head.layer2.weight"} if stage == "head" else set()
    )
    prefix = "head" if stage == "head" else "loss"
    for key in (f"{prefix}/pg", "r2po/head_w2_norm", "r2po/rollout_kl"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert_grads_close(g1, g2, rel=1e-4)
    # The exported folder holds the causal LM only, at any process count.
    assert not [k for k in (*w1, *w2) if "rollout_head" in k]


def test_weights_in_the_update_equal_the_prepass_path(runs):
    m_in, g_in, _ = result(runs[1, "padded"])
    m_pre, g_pre, _ = result(runs[1, "padded-prepass"])
    assert m_pre["resrl/groups_in_prepass"] == 4 and m_pre["resrl/groups_in_update"] == 0
    for key in ("resrl/neg_weight_mean", "resrl/neg_weight_min_frac", "resrl/distance_mean"):
        assert m_in[key] == pytest.approx(m_pre[key], rel=1e-5), key
    assert_grads_close(g_in, g_pre, rel=1e-5)


def test_saved_at_two_resumed_at_one_gives_the_same_next_step(runs, tmp_path):
    ckpt = runs[2, "grpo"] / "run" / "checkpoints" / "step_000001"
    assert (ckpt / "shards").is_dir()
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, one, str(one), "--resume", str(ckpt), "algorithm.objective=grpo")
    run(2, two, str(two), "--resume", str(ckpt), "algorithm.objective=grpo")
    m1, g1, p1 = result(one)
    m2, g2, p2 = result(two)
    assert_grads_close(g1, g2, rel=1e-5)
    assert m1["loss/pg"] == pytest.approx(m2["loss/pg"], rel=1e-5)
    # The second Adam step uses the restored moments: the weights agree much better than 2 lr.
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], atol=1e-3 * LR * 100, rtol=0, msg=name)
    # And the resumed run really continued from the checkpoint, not from scratch.
    _, g_fresh, _ = result(runs[1, "grpo"])
    assert any(not torch.allclose(g_fresh[k], g1[k]) for k in g1)


def test_clean_shutdown_repeatedly(tmp_path):
    for i in range(3):
        run(2, tmp_path / f"r{i}", str(tmp_path / f"r{i}"), "algorithm.objective=grpo")


def test_resrl_train_under_torchrun(tmp_path):
    args = [
        "train",
        "--preset",
        "tiny",
        *SMALL_RUN,
        "data.task_eval_size=4",
        "rollout.max_new_tokens=16",
        "train.mini_batch_prompts=2",
        "train.micro_batch_size=4",
        "sft.steps=2",
        "sft.batch_size=4",
        "run.device=cpu",
        f"run.out_dir={tmp_path}",
        "run.name=tr",
        "run.checkpoint_every=1",
    ]
    proc = run(2, tmp_path / "x", *args, module="resrl")
    assert "pass@1" in proc.stdout
    run_dir = tmp_path / "tr"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"pass@1", "pass@2"} <= set(summary["eval_after"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["optim/steps"] == 2.0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 2
