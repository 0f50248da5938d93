"""LoRA (`model.lora_rank > 0`): the adapter is all that trains, is checkpointed and is exported
beside the merged model; the base stays frozen in the compute dtype; the LM head's weight gradient
is never computed; FSDP2 at 2 processes equals 1; resume is exact."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small import SMALL_RUN
from torch.distributed.checkpoint import FileSystemReader

import kernels
from resrl import lora
from resrl.config import ConfigError, resolve
from resrl.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
# The modules (the package's `kernels.linear_logprob` is the function of that name).
_LL = importlib.import_module("kernels.linear_logprob")
_FL = importlib.import_module("kernels.fused_loss")
SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "eval.before=false",
    "run.name=run",
    "model.lora_rank=4",
    # Large enough that one step moves the adapter visibly.
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    # A barely warmed-up model answers nothing right: NSR's negatives still give a gradient.
    "algorithm.objective=nsr",
]


def _cfg(out, *extra):
    return resolve("tiny", overrides=[*SMALL, f"run.out_dir={out}", *extra])


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(out, *extra, launcher=(sys.executable, "-m", "resrl")) -> subprocess.CompletedProcess:
    cmd = [*launcher, "train", "--preset", "tiny", *SMALL, f"run.out_dir={out}", *extra]
    return subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora_alpha=16"], "model.lora_rank: is 0 (full fine-tuning) but model.lora_alpha is set"),
        (["model.lora_targets=[q_proj]"], "but model.lora_targets is set"),
        (["model.lora_rank=-1"], "model.lora_rank"),
        (["model.lora_rank=4", "model.lora_dropout=1.5"], "model.lora_dropout: must be in [0, 1)"),
        (["rollout.lora_serving=both"], "rollout.lora_serving"),
        (
            ["rollout.lora_serving=adapter"],
            "rollout.lora_serving: adapter needs model.lora_rank > 0 (a LoRA policy) and rollout.engine=vllm",
        ),
        (
            ["rollout.lora_serving=adapter", "model.lora_rank=8", "rollout.engine=vllm", "r2po.enabled=true"],
            "adapter needs r2po.enabled=false",
        ),
        (
            ["rollout.lora_serving=adapter", "model.lora_rank=1024", "rollout.engine=vllm"],
            "adapter needs model.lora_rank <= 512 (vLLM's largest); or use merged (the default)",
        ),
    ],
)
def test_lora_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve("tiny", overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_targets_are_refused_before_any_work_listing_the_models_layers(tmp_path):
    proc = _train(tmp_path, "model.lora_targets=[q_proj,qkv]", "sft.steps=1000")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("resrl: error")]
    assert line == [
        "resrl: error: config model.lora_targets: qkv is not a linear layer of this model's decoder "
        "blocks; accepted: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    ]
    assert not (tmp_path / "run" / "warm_start").exists()


# ---------------------------------------------------------------------------- the step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_step_trains_the_adapter_only_on_a_frozen_compute_dtype_base(tmp_path, dtype, monkeypatch):
    """bfloat16: the base is bf16 (no master copy) and the adapter fp32 masters under FSDP2; no
    gradient reaches the LM head, and the fused kernel is never asked for its weight gradient."""
    needed = []
    one_part = _LL.linear_logprob_backward_op
    fused = _FL.LinearLogprobLoss.apply

    def spy_one_part(*args, **kwargs):
        needed.append(args[9])  # need_weight
        return one_part(*args, **kwargs)

    def spy_fused(*args):
        needed.append(args[8])  # need_w
        return fused(*args)

    monkeypatch.setattr(_LL, "linear_logprob_backward_op", spy_one_part)
    monkeypatch.setattr(_FL.LinearLogprobLoss, "apply", spy_fused)
    trainer = Trainer(_cfg(tmp_path, f"model.dtype={dtype}", "algorithm.objective=nsr", "sft.steps=0"))
    model = trainer.policy.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in trainable else compute), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step(0)
    after = dict(model.named_parameters())
    for name in before:
        moved = not torch.equal(before[name], after[name].detach())
        # B starts at zero, so only B has a gradient on the first step.
        assert moved == (".lora_B." in name), name
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None
    assert needed and all(not n for n in needed)


def test_the_lm_head_weight_gradient_is_skipped_when_it_is_frozen(monkeypatch):
    calls = []
    original = _LL.linear_logprob_backward_op

    def spy(*args, **kwargs):
        calls.append((args[8], args[9]))  # need_hidden, need_weight
        return original(*args, **kwargs)

    monkeypatch.setattr(_LL, "linear_logprob_backward_op", spy)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(33, 16)
    logprob, _ = kernels.linear_logprob(hidden, weight, torch.randint(0, 33, (7,)))
    logprob.sum().backward()
    assert calls == [(True, False)] and hidden.grad is not None and weight.grad is None


# ---------------------------------------------------------------------------- checkpoints, export


def test_checkpoints_hold_the_adapter_only_and_the_exports_agree(tmp_path):
    """Warm start (full fine-tuning) -> base/ written once -> RL trains the adapter. Checkpoints
    hold the adapter and its optimizer; final/ is the merged model and final_adapter/ loads with
    PeftModel onto the base it names, to the same weights."""
    proc = _train(tmp_path, "train.steps=2", "run.checkpoint_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    meta = FileSystemReader(str(run / "checkpoints" / "step_000002" / "shards")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    warm = json.loads((run / "base" / "resrl_warm_start.json").read_text())
    assert warm["sft/loss_first"] > 0
    assert json.loads((run / "summary.json").read_text())["sft"] == warm

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((run / "final_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "base").resolve()) and config["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, run / "final_adapter").merge_and_unload().state_dict()
    final = load_file(run / "final" / "model.safetensors")
    for name, value in final.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=name)
    # The adapter moved the model away from its base.
    base_weights = load_file(run / "base" / "model.safetensors")
    assert any(not torch.equal(base_weights[k], final[k]) for k in final)


def test_a_killed_lora_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir()
    part.mkdir()
    args = ["train.steps=3", "run.checkpoint_every=1"]
    assert _train(whole, *args).returncode == 0
    cmd = [sys.executable, "-m", "resrl", "train", "--preset", "tiny", *SMALL, f"run.out_dir={part}", *args]
    proc = subprocess.Popen(cmd, cwd=part, env=_env(), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    latest = part / "run" / "checkpoints" / "latest"
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train(part, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(whole / "run" / "final" / "model.safetensors")
    b = load_file(part / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = load_file(whole / "run" / "final_adapter" / "adapter_model.safetensors")
    y = load_file(part / "run" / "final_adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_kl_reference_of_a_lora_run_is_its_base_and_resumes(tmp_path):
    args = ["train.steps=2", "run.checkpoint_every=1", "algorithm.kl_coef=0.1", "sft.steps=0"]
    assert _train(tmp_path, *args[:1], *args[2:], "train.steps=1", "run.checkpoint_every=1").returncode == 0
    resumed = _train(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The adapter starts at B = 0: the first step's policy is its reference.
    assert abs(rows[0]["loss/kl"]) < 1e-6


# ---------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("offload", [False, True])
def test_two_processes_equal_one(tmp_path, offload):
    """The trainer's whole step (dist_worker.py) at 1 and 2 gloo processes: the adapter's
    gradients, the loss and ResRL weights, and the merged export agree."""
    worker = ROOT / "tests" / "dist_worker.py"
    # No warm start: at N processes it averages per-rank means (dist_worker's full runs skip it too).
    extra = [
        "model.lora_rank=4",
        "sft.steps=0",
        "algorithm.objective=resrl",
        f"train.cpu_offload={str(offload).lower()}",
    ]
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        )
        env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [*launcher, str(worker), str(out), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = (
            json.loads((out / "result.json").read_text())["metrics"],
            torch.load(out / "grads.pt"),
            load_file(out / "exported" / "model.safetensors"),
        )
    (m1, g1, w1), (m2, g2, w2) = results[1], results[2]
    assert g1.keys() == g2.keys() and g1 and all(".lora_" in k for k in g1)
    for name in g1:
        scale = g1[name].abs().max().clamp_min(1e-12)
        assert ((g1[name] - g2[name]).abs().max() / scale).item() <= 1e-4, name
    for key in ("loss/policy", "resrl/weight_mean"):
        if key in m1:
            assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=2.1e-2, rtol=0, msg=name)


def test_hf_tensors_merge_like_peft():
    from peft.tuners.lora import LoraLayer

    from resrl.loading import load_model, load_task

    cfg = resolve("tiny", overrides=[*SMALL_RUN, "model.lora_rank=4"])
    tokenizer, _, _ = load_task(cfg)
    model = lora.apply(load_model(cfg, tokenizer, torch.device("cpu")), cfg, torch.float32)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_()
    ours = dict(lora.hf_tensors(model.named_parameters(), lora.scaling(model)))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    theirs = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(ours) <= set(theirs) and len(ours) >= len(theirs) - 1  # lm_head: tied, listed once
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_the_base_served_to_vllm_is_a_local_folder(tmp_path):
    from resrl import lora

    assert lora.local_folder(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError) as info:
        lora.local_folder("nobody-here/no-such-model-xyz")
    assert "not a local folder nor a downloaded Hugging Face Hub model" in str(info.value)
    assert "\n" not in str(info.value)
