"""The trainer end to end on a very small model: runs, pre-pass, gradient invariance, kernels paths,
resume, crash during a checkpoint save."""

import json
import math

import pytest
import torch
from small import SMALL_RUN
from transformers import AutoModelForCausalLM

from resrl import checkpoint
from resrl.algorithms import group_advantages, resrl_token_weights
from resrl.batch import RolloutBatch, responses_of
from resrl.config import ConfigError, RunError, resolve
from resrl.model import forward_logprobs
from resrl.prepass import prepass
from resrl.tracker import read_metrics
from resrl.trainer import Trainer

SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=4",
    "run.name=run",
]


# At this size every sampled answer is wrong (zero GRPO advantages); NSR still moves the policy.
MOVES = ["algorithm.objective=nsr", "optim.lr=5e-3"]


def small_cfg(tmp_path, *extra):
    return resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", *extra])


def test_fit_writes_run_directory(tmp_path):
    cfg = small_cfg(tmp_path, "run.name=e2e", "run.tensorboard=true", "run.checkpoint_every=1")
    summary = Trainer(cfg).fit()
    run = tmp_path / "e2e"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("eval_before", "eval_after"):
        assert {"pass@1", "pass@2", "avg@2", "maj@2"} <= set(on_disk[key])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "loss/pg", "optim/grad_norm", "time/rollout_s", "rollout/logprob_gap"):
        assert key in rows[0]
    # On-policy first update: the trainer's log-probs are the engine's sampling log-probs.
    assert rows[0]["rollout/logprob_gap"] < 1e-4
    assert list((run / "tensorboard").iterdir())
    assert (run / "eval" / "after_samples.jsonl").is_file()
    assert checkpoint.latest(run).name == "step_000002"
    assert len(list((run / "checkpoints").glob("step_*"))) == 2
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("objective", ["grpo", "psr", "nsr", "w_reinforce", "ace"])
def test_every_objective_trains(tmp_path, objective):
    cfg = small_cfg(tmp_path, f"algorithm.objective={objective}", "train.steps=1", "eval.before=false")
    Trainer(cfg).fit()
    (row,) = read_metrics(tmp_path / "run")
    assert row["optim/steps"] == 1.0
    assert all(v == v for v in row.values() if isinstance(v, float))


def _batch_with_mixed_groups(trainer, n_prompts=3, seed=0):
    """Real prompts with random responses; positives assigned so every group is mixed."""
    g = trainer.cfg.rollout.n
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, positive, groups = [], [], [], []
    for slot in range(n_prompts):
        for j in range(g):
            prompts.append(trainer.train_set.prompt_ids[slot])
            length = int(torch.randint(3, 12, (1,), generator=gen))
            responses.append(torch.randint(4, 40, (length,), generator=gen).tolist())
            positive.append(j < g // 2)
            groups.append(100 + slot)
    return RolloutBatch.scored(prompts, responses, positive, groups)


def test_ace_rescales_negative_advantages_from_the_prepass_log_probs(tmp_path):
    """ACE's first step: the policy is its own reference (shift 0), so every negative advantage is
    scaled by 1 + alpha ln 2; one update per rollout keeps the loss on-policy (no old log-probs)."""
    trainer = Trainer(small_cfg(tmp_path, "algorithm.objective=ace", "algorithm.ace_alpha=0.5"))
    batch = _batch_with_mixed_groups(trainer, n_prompts=trainer.cfg.train.prompts_per_step)
    trainer.rollout = lambda slots, step: batch
    seen = {}
    trainer.update = lambda b, adv, step, plan, **kw: seen.update(adv=adv, values=set(b.token_values)) or {}
    metrics = trainer.train_step(0)
    grpo = group_advantages(batch.rewards, batch.group, "grpo", batch.positive)
    expected = torch.where(grpo < 0, grpo * (1 + 0.5 * math.log(2)), grpo)
    torch.testing.assert_close(seen["adv"], expected)
    assert seen["values"] == {"ref_logprob"}
    assert metrics["ace/shift_mean_neg"] == 0.0
    assert metrics["ace/scale_mean_neg"] == pytest.approx(1 + 0.5 * math.log(2))


@pytest.mark.parametrize("layer", ["penultimate", "final"])
def test_prepass_weights_equal_the_reference(tmp_path, layer):
    cfg = small_cfg(tmp_path, f"algorithm.subspace_layer={layer}", "algorithm.subspace_rank=3")
    trainer = Trainer(cfg)
    batch = _batch_with_mixed_groups(trainer)
    metrics = prepass(
        trainer.policy,
        batch,
        cfg.algorithm,
        temperature=1.0,
        micro_batch_size=5,
        pad_id=0,
        seed=7,
        need_old=True,
    )
    assert metrics["resrl/groups_weighted"] == 3.0
    # Reference: one forward over everything, the kernels-level function on the gathered tokens.
    idx = list(range(len(batch)))
    t = batch.collate(idx, 0, torch.device("cpu"))
    with torch.no_grad():
        out = forward_logprobs(trainer.model, t["input_ids"], t["attention_mask"], subspace_layer=layer)
    resp = t["resp_mask"]
    hidden_ND = responses_of(out["sub_hidden"], t)[resp]
    rows = torch.arange(len(batch))[:, None].expand_as(resp)[resp]
    expected = resrl_token_weights(
        hidden_ND,
        batch.group[rows],
        batch.positive[rows],
        rank=3,
        max_tokens=cfg.algorithm.subspace_max_tokens,
        seed=7,
    )
    got = torch.cat(batch.token_values["resrl_weight"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[~batch.positive[rows]] < 1).any()
    old = torch.cat(batch.token_values["old_logprob"])
    torch.testing.assert_close(old, responses_of(out["logprob"], t)[resp], atol=1e-5, rtol=1e-5)


def _grads_of_one_update(trainer, batch):
    grads = {}

    def record():
        for name, p in trainer.model.named_parameters():
            grads[name] = p.grad.detach().clone()

    trainer.optimizer.step = record
    seq_adv = torch.linspace(-1.5, 1.5, len(batch))
    trainer.update(batch, seq_adv, step=0)
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_does_not_depend_on_micro_batching(tmp_path, agg):
    cfg_one = small_cfg(tmp_path, "run.name=a", "train.micro_batch_size=8", f"algorithm.agg={agg}")
    cfg_many = small_cfg(tmp_path, "run.name=b", "train.micro_batch_size=1", f"algorithm.agg={agg}")
    results = []
    for cfg in (cfg_one, cfg_many):
        trainer = Trainer(cfg)
        batch = _batch_with_mixed_groups(trainer, n_prompts=2)
        prepass(
            trainer.policy,
            batch,
            cfg.algorithm,
            temperature=1.0,
            micro_batch_size=8,
            pad_id=0,
            seed=0,
            need_old=False,
        )
        results.append(_grads_of_one_update(trainer, batch))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in results[0].values())


def test_torch_and_triton_kernels_give_the_same_run(tmp_path, monkeypatch, triton_on_cpu):
    """The trainer on the CPU (SMALL_RUN), Triton under the interpreter; on CUDA the kernel tests
    compare the two paths and test_gpu_training_steps runs the trainer with Triton."""
    losses = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
        cfg = small_cfg(
            tmp_path, f"run.name={impl}", "sft.steps=2", "eval.before=false", "eval.max_problems=2"
        )
        Trainer(cfg).fit()
        losses[impl] = read_metrics(tmp_path / impl)
    for a, b in zip(losses["torch"], losses["triton"], strict=True):
        for key in ("reward/mean", "loss/pg", "optim/grad_norm", "loss/entropy", "response/length_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}


def test_resume_gives_the_same_next_step(tmp_path):
    straight = small_cfg(tmp_path, "run.name=straight", "train.steps=3")
    Trainer(straight).fit()
    # Interrupted after step 2 (its checkpoint), then resumed with the full step budget.
    Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=2")).fit()
    resumed = Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=3"))
    assert resumed.step == 2
    resumed.fit()
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert _comparable(a[2]) == pytest.approx(_comparable(b[2]), rel=1e-6, abs=1e-7)
    for name, p in AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").state_dict().items():
        q = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "final").state_dict()[name]
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        break


def test_kl_reference_is_checkpointed_and_restored(tmp_path):
    kl = [*MOVES, "algorithm.kl_coef=0.5", "eval.before=false"]
    straight = small_cfg(tmp_path, "run.name=straight", "train.steps=3", *kl)
    Trainer(straight).fit()
    Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=2", *kl)).fit()
    resumed = Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=3", *kl))
    # The reference is the policy where RL started, not the policy being resumed.
    ref = dict(resumed.ref_policy.model.named_parameters())
    moved = [n for n, p in resumed.model.named_parameters() if not torch.equal(p, ref[n])]
    assert moved
    resumed.fit()
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert a[0]["loss/kl"] == 0.0 and a[2]["loss/kl"] > 0.0
    assert _comparable(a[2]) == pytest.approx(_comparable(b[2]), rel=1e-6, abs=1e-7)
    # A checkpoint saved without a KL term cannot supply a reference, even when forced.
    Trainer(small_cfg(tmp_path, "run.name=nokl", "train.steps=1", "eval.before=false")).fit()
    with pytest.raises(ConfigError, match="config differs from the checkpoint .* algorithm.kl_coef"):
        Trainer(small_cfg(tmp_path, "run.name=nokl", "train.steps=2", *kl))
    with pytest.raises(ConfigError, match="has no KL reference model"):
        Trainer(small_cfg(tmp_path, "run.name=nokl", "train.steps=2", *kl, "run.resume=force"))


def test_cpu_offload_in_one_process_trains_like_the_plain_run(tmp_path):
    """train.cpu_offload shards with FSDP2 in a one-process group (pinned host memory on GPUs;
    unpinned here): same rollouts, losses and weights as the unsharded run."""
    import torch.distributed as dist

    rows = {}
    try:
        for offload in (False, True):
            name = f"offload{offload}"
            cfg = small_cfg(
                tmp_path, f"run.name={name}", f"train.cpu_offload={offload}", "eval.before=false", *MOVES
            )
            trainer = Trainer(cfg)
            assert trainer.sharded is offload
            trainer.fit()
            rows[offload] = read_metrics(tmp_path / name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for a, b in zip(rows[False], rows[True], strict=True):
        assert a["optim/grad_norm"] > 0
        assert _comparable(a) == pytest.approx(_comparable(b), rel=1e-4, abs=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "offloadFalse" / "final").state_dict()
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloadTrue" / "final").state_dict()
    assert plain.keys() == offloaded.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], offloaded[name], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_training_steps(tmp_path, offload):
    """On CUDA: bf16 (plain, or FSDP2 fp32 masters + bf16 compute with pinned CPU offload), the
    Triton kernels, two steps with finite losses and per-phase peak memory."""
    import torch.distributed as dist

    cfg = small_cfg(tmp_path, "run.device=cuda", f"train.cpu_offload={offload}", "eval.before=false", *MOVES)
    try:
        Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for row in read_metrics(tmp_path / "run"):
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN
        assert row["optim/grad_norm"] > 0 and row["memory/update_peak_gib"] > 0


@pytest.mark.parametrize("where", ["shards", "rename"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    trainer = Trainer(small_cfg(tmp_path, "train.steps=1", "eval.before=false"))
    trainer.step = 1
    first = trainer.save()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def crash_in_shards(state, checkpoint_id, **kwargs):
        (checkpoint.Path(checkpoint_id)).mkdir(parents=True)
        (checkpoint.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    def crash_at_rename(src, dst):
        raise OSError("power cut")

    if where == "shards":
        monkeypatch.setattr(checkpoint.dcp, "save", crash_in_shards)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", crash_at_rename)
    trainer.step = 2
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    with pytest.raises(RunError, match="disk full|power cut"):
        trainer.save()
    # The failed save removed its partial folder.
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert checkpoint.latest(run) == first
    # The previous checkpoint still loads, with the weights it had.
    resumed = Trainer(small_cfg(tmp_path, "train.steps=1", "eval.before=false"))
    assert resumed.step == 1
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    # The next save cleans the leftover and moves the pointer.
    trainer.step = 3
    third = trainer.save()
    assert checkpoint.latest(run) == third
    assert not list((run / "checkpoints").glob(".*tmp"))


def test_fresh_run_without_resume_starts_over(tmp_path):
    Trainer(small_cfg(tmp_path, "train.steps=1", "eval.before=false")).fit()
    again = Trainer(small_cfg(tmp_path, "train.steps=1", "eval.before=false", "run.resume=false"))
    assert again.step == 0


def test_files_as_data(tmp_path):
    from resrl.tasks import write_dataset

    train = write_dataset(tmp_path / "train.jsonl", 32, seed=3)
    held = write_dataset(tmp_path / "held.parquet", 4, seed=4, fmt="verl")
    cfg = small_cfg(
        tmp_path, f"data.train_files={train}", f"data.eval_files={held}", "train.steps=1", "eval.before=false"
    )
    summary = Trainer(cfg).fit()
    assert summary["eval_after"]["n_problems"] == 4


def test_bad_setups_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="train.prompts_per_step=128 exceeds the 64 training prompts"):
        Trainer(small_cfg(tmp_path, "train.prompts_per_step=128", "train.mini_batch_prompts=64"))
    train = tmp_path / "t.jsonl"
    train.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(ConfigError, match="data.eval_files: needed with data.train_files"):
        Trainer(small_cfg(tmp_path, f"data.train_files={train}"))
    cfg = small_cfg(
        tmp_path,
        f"data.train_files={train}",
        f"data.eval_files={train}",
        "train.prompts_per_step=1",
        "train.mini_batch_prompts=1",
    )
    with pytest.raises(ValueError, match="needs a 'solution' for every training row"):
        Trainer(cfg).fit()
    with pytest.raises(ConfigError, match="model.attn_implementation: 'xformers' is not supported; accepted"):
        small_cfg(tmp_path, "model.attn_implementation=xformers")
    # The run is on the CPU (SMALL_RUN) on every machine.
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA device and the flash-attn"):
        Trainer(small_cfg(tmp_path, "model.attn_implementation=flash_attention_2"))
    with pytest.raises(ConfigError, match="model.vocab_size=10 is smaller than the tokenizer's"):
        Trainer(small_cfg(tmp_path, "model.vocab_size=10"))


def test_model_shape_fields(tmp_path):
    """A real checkpoint's shape from the config: wider vocabulary, untied LM head, eager attention."""
    cfg = small_cfg(
        tmp_path,
        "model.vocab_size=1000",
        "model.tie_word_embeddings=false",
        "model.attn_implementation=eager",
    )
    model = Trainer(cfg).model
    assert model.get_input_embeddings().num_embeddings == 1000
    assert model.lm_head.weight.shape[0] == 1000
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config._attn_implementation == "eager"


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("cap, factor", [(2.0, 1.5), (1.2, 1.2)])
def test_truncated_importance_sampling_scales_the_gradient(tmp_path, cap, factor):
    grads = []
    for tis in (0.0, cap):
        trainer = Trainer(
            small_cfg(tmp_path, f"run.name=tis{tis}", f"algorithm.tis_cap={tis}", "optim.grad_clip=0")
        )
        batch = _batch_with_mixed_groups(trainer, n_prompts=2)
        prepass(
            trainer.policy,
            batch,
            trainer.cfg.algorithm,
            temperature=1.0,
            micro_batch_size=8,
            pad_id=0,
            seed=0,
            need_old=True,
        )
        # The engine gave every token 1/1.5 of the trainer's probability: weight 1.5, capped.
        batch.sample_logprob = [lp - torch.log(torch.tensor(1.5)) for lp in batch.token_values["old_logprob"]]
        grads.append(_grads_of_one_update(trainer, batch))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], factor * grads[0][name], atol=1e-6, rtol=1e-4)
