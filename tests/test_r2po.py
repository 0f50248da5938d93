"""R²PO (resrl.r2po, resrl.rollout_head): the head's π_roll against naive logits, rarity, the
schedule, config errors, hf sampling from π_roll, stage A/B isolation, the GRPO regression, resume
mid-round, exports without the head, and resuming across r2po.enabled."""

import math

import pytest
import torch
from safetensors.torch import load_file
from small import SMALL_RUN

from resrl.algorithms import group_advantages, rarity
from resrl.batch import RolloutBatch
from resrl.config import ConfigError, resolve
from resrl.model import build_qwen3, forward_logprobs
from resrl.r2po import HEAD, POLICY, stage_name
from resrl.rollout import SamplingParams
from resrl.rollout.hf import HFEngine
from resrl.rollout_head import RolloutHead
from resrl.tracker import read_metrics
from resrl.trainer import Trainer

SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "train.micro_batch_size=8",
    "eval.max_problems=2",
    "eval.before=false",
    "sft.steps=2",
    "run.name=run",
]
R2PO = ["r2po.enabled=true", "r2po.head_init_std=0.05", "r2po.head_lr=1e-2"]


def small_cfg(tmp_path, *extra):
    return resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", *extra])


def mixed_batch(trainer, n_prompts, seed=0):
    """Real prompts, random responses; rewards 1, 0.25 or -1 so groups are mixed and rarity varies."""
    g = trainer.cfg.rollout.n
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, positive, groups, rewards = [], [], [], [], []
    for slot in range(n_prompts):
        for j in range(g):
            prompts.append(trainer.train_set.prompt_ids[slot])
            length = int(torch.randint(3, 12, (1,), generator=gen))
            responses.append(torch.randint(4, 40, (length,), generator=gen).tolist())
            positive.append(j < 1 + slot % (g - 1))
            groups.append(slot)
            rewards.append(1.0 if positive[-1] else (0.25 if j == g - 1 else -1.0))
    batch = RolloutBatch.scored(prompts, responses, positive, groups)
    batch.rewards = torch.tensor(rewards)
    return batch


# ----------------------------------------------------------------------------- the head


def naive_roll_logprob(hidden, weight, w1, w2, target, temperature):
    logits = (hidden @ weight.t() + torch.relu(hidden @ w1.t()) @ w2.t()) / temperature
    return torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)


@pytest.mark.parametrize("n", [1, 7])
def test_head_log_probs_and_every_gradient_equal_naive_logits(n):
    """fp32 through the head (two-part fused LM head, autograd through W1's ReLU) against naive
    full logits in fp64 from the same values: log-prob and the gradients of h, W, W1, W2."""
    d, v = 13, 37
    gen = torch.Generator().manual_seed(n)
    head = RolloutHead(d, v).reset(0.3, seed=1)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=gen)
    up = torch.randn(n, generator=gen, dtype=torch.float64)
    got, _ = head(hidden, weight, target, temperature=0.7)
    leaves = [hidden, weight, head.layer1.weight, head.layer2.weight]
    grads = torch.autograd.grad((got.double() * up).sum(), leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    want = naive_roll_logprob(leaves64[0], leaves64[1], leaves64[2], leaves64[3], target, 0.7)
    wgrads = torch.autograd.grad((want * up).sum(), leaves64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, wgrads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_a_zero_head_gives_the_policy_log_probs_bitwise():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=gen), torch.randn(29, 16, generator=gen)
    target = torch.randint(0, 29, (5,), generator=gen)
    import kernels

    plain, _ = kernels.linear_logprob(hidden, weight, target)
    roll, _ = RolloutHead(16, 29).reset(0.0, seed=0)(hidden, weight, target)
    assert torch.equal(plain, roll)


# ----------------------------------------------------------------------------- rarity and schedule


def test_rarity_on_the_reference_rewards_and_binary_groups():
    r = torch.tensor([2.25, 2.25, 0.25, -2.0, 0.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(rarity(r, g), torch.tensor([0.5, 0.5, 1.0, 1.0, 0.25, 0.25, 0.25, 0.25]))
    # Binary rewards, G = 8, k correct: the z-scored rarity is sign(G/2 - k) times GRPO's.
    g8 = torch.zeros(8, dtype=torch.long)
    for k in range(1, 8):
        r = torch.tensor([1.0] * k + [-1.0] * (8 - k))
        got = group_advantages(rarity(r, g8), g8, "grpo")
        # (Equal up to the 1e-6 added to the std, which weighs more on rarity's smaller spread.)
        want = (1 if k < 4 else -1 if k > 4 else 0) * group_advantages(r, g8, "grpo")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # All equal: zero advantage (the reference skips the group); a group of one: zero.
    same = group_advantages(
        rarity(torch.ones(4), torch.zeros(4, dtype=torch.long)), torch.zeros(4, dtype=torch.long)
    )
    assert torch.equal(same, torch.zeros(4))
    one = group_advantages(
        rarity(torch.ones(1), torch.zeros(1, dtype=torch.long)), torch.zeros(1, dtype=torch.long)
    )
    assert torch.equal(one, torch.zeros(1))
    with pytest.raises(ValueError, match="reward_class contains NaN"):
        rarity(torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.long))


def test_schedule_is_a_pure_function_of_the_step():
    assert [stage_name(s, 2, 3) for s in range(7)] == [HEAD, HEAD, POLICY, POLICY, POLICY, HEAD, HEAD]
    assert {stage_name(s, 0, 1) for s in range(5)} == {POLICY}


@pytest.mark.parametrize(
    "override, message",
    [
        ("r2po.head_steps=-1", "r2po.head_steps: must be >= 0"),
        ("r2po.policy_steps=0", "r2po.policy_steps: must be >= 1"),
        ("r2po.head_lr=0", "r2po.head_lr: must be > 0 or null"),
        (
            "r2po.head_advantage=count",
            "r2po.head_advantage: 'count' is not supported; accepted: rarity, grpo",
        ),
        ("r2po.head_kl_target=base", "r2po.head_kl_target: 'base' is not supported"),
        ("rollout.n=1 algorithm.objective=nsr", "rollout.n: R²PO"),
    ],
)
def test_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        small_cfg(tmp_path, "r2po.enabled=true", *override.split())


# ----------------------------------------------------------------------------- sampling


class _Tok:
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _trainer_roll_logprobs(model, head, samples, temperature):
    flat = [s for group in samples for s in group]
    batch = RolloutBatch.scored(
        [s.prompt_ids for s in flat], [s.response_ids for s in flat], [True] * len(flat), [0] * len(flat)
    )
    t = batch.collate(list(range(len(flat))), 0, torch.device("cpu"))
    with torch.no_grad():
        common = dict(positions=t["positions"], temperature=temperature)
        roll = forward_logprobs(model, t["input_ids"], t["attention_mask"], rollout_head=head, **common)
        base = forward_logprobs(model, t["input_ids"], t["attention_mask"], **common)
    sampled = torch.cat([torch.tensor(s.logprobs) for s in flat])
    return sampled, roll["logprob"], base["logprob"]


def test_hf_engine_samples_pi_roll_and_pi_with_the_flag_off():
    model = build_qwen3(50, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    head = RolloutHead(64, 50).reset(0.2, seed=0)
    engine = HFEngine(model, _Tok())
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(RuntimeError, match="call sync_head"):
        engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, rollout_head=True))
    engine.sync_head(head)
    on = engine.generate(
        prompts, SamplingParams(n=2, max_new_tokens=8, seed=1, temperature=0.8, rollout_head=True)
    )
    sampled, roll, base = _trainer_roll_logprobs(model, head, on, 0.8)
    assert (sampled - roll).abs().max() <= 1e-5
    assert (sampled - base).abs().max() > 0.1
    off = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=1, temperature=0.8))
    sampled, roll, base = _trainer_roll_logprobs(model, head, off, 0.8)
    assert (sampled - base).abs().max() <= 1e-5
    # The hook is removed even when generate raises.
    with pytest.raises(ValueError):
        engine.generate([[3, 99]], SamplingParams(n=1, max_new_tokens=4, rollout_head=True))
    assert not model.get_output_embeddings()._forward_hooks


# ----------------------------------------------------------------------------- the stages


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_head_step_trains_only_the_head_and_policy_step_only_the_policy(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, *R2PO, "r2po.head_kl_coef=0.1"))
    trainer.rollout = lambda slots, step: mixed_batch(trainer, len(slots), seed=step)
    policy0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    head0 = {n: p.detach().clone() for n, p in trainer.policy.rollout_head.named_parameters()}
    seen = {}
    step = trainer.r2po.head_stage.optimizer.step

    def record():
        seen.update({n: p.grad for n, p in trainer.policy.named_parameters()})
        step()

    trainer.r2po.head_stage.optimizer.step = record
    m = trainer.train_step(0)
    assert m["r2po/stage"] == 0.0 and m["optim/head_grad_norm"] > 0 and "head/pg" in m
    assert "loss/pg" not in m and m["r2po/rollout_kl"] != 0.0
    # Stage A: only W1 and W2 got gradients; the trunk and LM head none at all.
    assert {n for n, g in seen.items() if g is not None} == {
        "rollout_head.layer1.weight",
        "rollout_head.layer2.weight",
    }
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, policy0[n]), n
    moved = {n: p.detach().clone() for n, p in trainer.policy.rollout_head.named_parameters()}
    assert all(not torch.equal(moved[n], head0[n]) for n in moved)
    m = trainer.train_step(1)
    assert m["r2po/stage"] == 1.0 and "loss/pg" in m and m["optim/grad_norm"] > 0
    for n, p in trainer.policy.rollout_head.named_parameters():
        assert torch.equal(p, moved[n]), n
    assert any(not torch.equal(p, policy0[n]) for n, p in trainer.model.named_parameters())


def test_kl_target_policy_keeps_no_reference_model(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, *R2PO, "r2po.head_kl_target=policy", "r2po.head_kl_coef=0.5"))
    trainer.rollout = lambda slots, step: mixed_batch(trainer, len(slots))
    m = trainer.train_step(0)
    assert trainer.ref_policy is None
    # KL(π_roll ‖ π) at a head of std 0.05: small but not zero.
    assert m["head/kl"] > 0 and math.isfinite(m["head/kl"])


def _weights(path):
    return load_file(path / "model.safetensors")


def test_head_steps_zero_and_a_zero_head_is_the_grpo_run(tmp_path):
    moves = ["algorithm.objective=nsr", "optim.lr=5e-3", "train.steps=2"]
    Trainer(small_cfg(tmp_path, "run.name=plain", *moves)).fit()
    Trainer(
        small_cfg(
            tmp_path,
            "run.name=r2po",
            *moves,
            "r2po.enabled=true",
            "r2po.head_steps=0",
            "r2po.head_init_std=0",
        )
    ).fit()
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "r2po")
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if not k.startswith(("time/", "throughput/", "memory/")):
                assert rb[k] == v, k
        assert rb["r2po/stage"] == 1.0 and rb["r2po/head_w2_norm"] == 0.0
    wa, wb = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "r2po" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_mid_round_equals_the_uninterrupted_run_and_exports_have_no_head(tmp_path):
    r2po = [*R2PO, "r2po.head_steps=2", "r2po.policy_steps=1", "algorithm.objective=nsr", "optim.lr=5e-3"]
    Trainer(small_cfg(tmp_path, "run.name=straight", "train.steps=3", *r2po)).fit()
    # Interrupted after step 1: in the middle of the round's two head steps.
    Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=1", *r2po)).fit()
    resumed = Trainer(small_cfg(tmp_path, "run.name=resumed", "train.steps=3", *r2po))
    assert resumed.step == 1
    resumed.fit()
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["r2po/stage"] for r in a] == [0.0, 0.0, 1.0]
    for k, v in a[2].items():
        if not k.startswith(("time/", "throughput/")):
            assert b[2][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    for k in ("r2po/head_w1_norm", "r2po/head_w2_norm"):
        assert b[1][k] == pytest.approx(a[1][k], rel=1e-6)
    weights = _weights(tmp_path / "straight" / "final")
    assert not [k for k in weights if "rollout_head" in k]
    # Resuming across r2po.enabled is one clear line (forced past the config comparison).
    with pytest.raises(ConfigError, match="saved with R²PO's rollout head; resume with r2po.enabled=True"):
        Trainer(small_cfg(tmp_path, "run.name=straight", "train.steps=4", "algorithm.objective=nsr",
                          "optim.lr=5e-3", "run.resume=force"))  # fmt: skip


def test_evaluation_never_samples_with_the_head(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, *R2PO))
    flags = []
    generate = trainer.engine.generate

    def recording(prompts, params):
        flags.append(params.rollout_head)
        return generate(prompts, params)

    trainer.engine.generate = recording
    trainer.evaluate("before")
    assert flags and not any(flags)
    trainer.rollout([0, 1], 0)
    assert flags[-1] is True
