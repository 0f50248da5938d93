"""The LM head on response rows only: the same log-probs, entropies, hidden states, pre-pass values,
losses and gradients as scoring every position (today's path before issue 13), padded and packed.

The oracle of the update (response rows, with the loss formed inside the LM-head pass) is the
whole-layout path written out here: `forward_logprobs` on every position, `responses_of`, then
`policy_loss` per micro-batch with the global divisors, backward through `linear_logprob`.
"""

import pytest
import torch
from small import SMALL_RUN

from resrl.algorithms import policy_loss, token_advantages, truncated_is
from resrl.batch import RolloutBatch, responses_from_rows, responses_of
from resrl.config import resolve
from resrl.model import build_qwen3, forward_logprobs
from resrl.prepass import prepass
from resrl.trainer import Trainer
from resrl.update import optimizer_step

SMALL = [
    *SMALL_RUN,
    "data.task_eval_size=4",
    "train.steps=1",
    "train.micro_batch_size=3",
    "eval.max_problems=2",
    "eval.before=false",
    "optim.grad_clip=0",
]


def random_batch(n=8, seed=0, vocab=50, group=4):
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(
            4, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen
        ).tolist()

    prompts = [ids(1, 9) for _ in range(n)]
    responses = [ids(1, 13) for _ in range(n)]
    # One empty response: it has no row at all in the response-rows layout.
    responses[3] = []
    positive = [i % 2 == 0 for i in range(n)]
    logprobs = [-torch.rand(len(r), generator=gen) for r in responses]
    return RolloutBatch.scored(prompts, responses, positive, [i // group for i in range(n)], logprobs)


@pytest.fixture
def model():
    return build_qwen3(
        50, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=1
    )


def _forward_and_grads(model, t, rows_only, layer):
    model.zero_grad()
    kwargs = {"positions": t["positions"]} if rows_only else {}
    out = forward_logprobs(
        model,
        t["input_ids"],
        t.get("attention_mask"),
        position_ids=t.get("position_ids"),
        temperature=0.9,
        return_entropy=True,
        subspace_layer=layer,
        **kwargs,
    )
    gather = responses_from_rows if rows_only else responses_of
    lp, ent, hid = (gather(out[k], t) for k in ("logprob", "entropy", "sub_hidden"))
    coef = torch.linspace(-1, 1, lp.numel()).view_as(lp)
    torch.where(t["resp_mask"], lp * coef + 0.3 * ent, 0.0).sum().backward()
    return lp, ent, hid, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("layer", ["penultimate", "final"])
def test_response_rows_give_the_all_rows_values_and_gradients(model, packed, layer):
    batch = random_batch()
    t = batch.collate(list(range(len(batch))), 0, torch.device("cpu"), packed=packed)
    assert t["positions"].numel() == sum(len(r) for r in batch.response_ids)
    lp_all, ent_all, hid_all, g_all = _forward_and_grads(model, t, False, layer)
    lp, ent, hid, g = _forward_and_grads(model, t, True, layer)
    mask = t["resp_mask"]
    torch.testing.assert_close(lp[mask], lp_all[mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent[mask], ent_all[mask], atol=1e-6, rtol=1e-5)
    # The hidden states are gathered, not computed: bit for bit.
    assert torch.equal(hid[mask], hid_all[mask])
    assert (lp[~mask] == 0).all()
    for name in g_all:
        torch.testing.assert_close(g[name], g_all[name], atol=1e-6, rtol=1e-4, msg=name)


def test_positions_are_checked(model):
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, B \* \(L-1\)\) = \[0, 8\)"):
        forward_logprobs(model, ids, mask, positions=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="positions must be an int64 tensor"):
        forward_logprobs(model, ids, mask, positions=torch.tensor([0.0]))
    empty = forward_logprobs(model, ids, mask, positions=torch.zeros(0, dtype=torch.long))
    assert empty["logprob"].shape == (0,)


@pytest.mark.parametrize("max_tokens", [0, 40], ids=["padded", "packed"])
def test_prepass_old_and_reference_log_probs_equal_all_rows(tmp_path, max_tokens):
    cfg = resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", "algorithm.subspace_rank=2"])
    trainer = Trainer(cfg)
    batch = random_batch(seed=3)
    ref = Trainer(resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", "run.seed=5"])).policy
    prepass(
        trainer.policy,
        batch,
        cfg.algorithm,
        temperature=0.9,
        micro_batch_size=3,
        pad_id=0,
        max_tokens=max_tokens,
        seed=1,
        need_old=True,
        ref_policy=ref,
    )
    t = batch.collate(list(range(len(batch))), 0, torch.device("cpu"))
    with torch.no_grad():
        for key, policy in (("old_logprob", trainer.policy), ("ref_logprob", ref)):
            out = policy(t["input_ids"], t["attention_mask"], temperature=0.9)
            want = responses_of(out["logprob"], t)[t["resp_mask"]]
            got = torch.cat(batch.token_values[key])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=key)
    assert not torch.allclose(
        torch.cat(batch.token_values["old_logprob"]), torch.cat(batch.token_values["ref_logprob"])
    )
    assert [len(w) for w in batch.token_values["resrl_weight"]] == [len(r) for r in batch.response_ids]


def all_rows_update(trainer, batch, idx, seq_adv):
    """The update as it was before issue 13 (every position through the LM head, `policy_loss` on
    the [b, T] layout): (gradients, summed pg loss)."""
    cfg, algo = trainer.cfg, trainer.cfg.algorithm
    lengths = batch.response_lengths()
    kept = [i for i in idx if (algo.objective != "psr" or batch.positive[i])]
    token_count = float(lengths[kept].sum())
    seq_count = float(sum(1 for i in kept if lengths[i] > 0))
    policy = trainer.policy
    policy.zero_grad(set_to_none=True)
    budget = cfg.train.max_tokens_per_micro_batch if cfg.train.pack else 0
    pg = 0.0
    for mb in batch.micro_batches(idx, cfg.train.micro_batch_size, budget):
        t = batch.collate(mb, trainer.pad_id, torch.device("cpu"), packed=cfg.train.pack)
        out = policy(
            t["input_ids"],
            t.get("attention_mask"),
            position_ids=t.get("position_ids"),
            temperature=cfg.rollout.temperature,
            return_entropy=True,
        )
        lp = responses_of(out["logprob"], t)
        adv, mask = token_advantages(
            algo.objective, seq_adv[mb], t["positive"], t["resp_mask"], t.get("resrl_weight"),
            pos_scale=algo.pos_scale, w_lambda=algo.w_lambda,
        )  # fmt: skip
        if algo.tis_cap > 0:
            old = lp.detach() if t.get("old_logprob") is None else t["old_logprob"]
            adv, _ = truncated_is(adv, mask, t["sample_logprob"], old, cap=algo.tis_cap)
        loss, m = policy_loss(
            lp, t.get("old_logprob"), adv, mask,
            eps_low=algo.eps_low, eps_high=algo.eps_high, dual_clip=algo.dual_clip, agg=algo.agg,
            token_count=token_count, seq_count=seq_count, norm_len=cfg.rollout.max_new_tokens,
            ref_logprob=t.get("ref_logprob"), kl_coef=algo.kl_coef, kl_kind=algo.kl_kind,
            entropy=responses_of(out["entropy"], t), entropy_coef=algo.entropy_coef,
        )  # fmt: skip
        loss.backward()
        pg += m["pg_loss"]
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, pg


UPDATE_CASES = {
    "token-mean": [],
    "seq-mean-token-mean": ["algorithm.agg=seq-mean-token-mean"],
    "drgrpo-norm": ["algorithm.agg=seq-mean-token-sum-norm", "algorithm.objective=grpo"],
    "kl-k3-entropy": ["algorithm.kl_coef=0.3", "algorithm.entropy_coef=0.05"],
    "kl-k2-psr": ["algorithm.kl_coef=0.2", "algorithm.kl_kind=k2", "algorithm.objective=psr"],
    "tis": ["algorithm.tis_cap=1.5", "algorithm.objective=w_reinforce"],
    "packed": ["train.pack=true", "train.max_tokens_per_micro_batch=30"],
    "packed-seq-mean": [
        "train.pack=true",
        "train.max_tokens_per_micro_batch=30",
        "algorithm.agg=seq-mean-token-mean",
    ],
}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_gradient_and_loss_equal_the_all_rows_path(tmp_path, case, off_policy):
    overrides = [*SMALL, f"run.out_dir={tmp_path}", "rollout.temperature=0.9", *UPDATE_CASES[case]]
    cfg = resolve("tiny", overrides=overrides)
    trainer = Trainer(cfg)
    batch = random_batch(seed=11)
    ref = (
        Trainer(resolve("tiny", overrides=[*overrides, "run.seed=5"])).policy
        if cfg.algorithm.kl_coef
        else None
    )
    prepass(
        trainer.policy, batch, cfg.algorithm, temperature=0.9, micro_batch_size=3, pad_id=0,
        seed=2, need_old=off_policy, ref_policy=ref,
    )  # fmt: skip
    if off_policy:
        # Stale log-probs far enough off for both clip branches and the dual clip to be active.
        gen = torch.Generator().manual_seed(0)
        batch.token_values["old_logprob"] = [
            lp + 1.5 * torch.randn(len(lp), generator=gen) for lp in batch.token_values["old_logprob"]
        ]
    seq_adv = torch.linspace(-1.5, 1.2, len(batch))
    idx = list(range(len(batch)))
    want, want_pg = all_rows_update(trainer, batch, idx, seq_adv)
    got = {}
    trainer.optimizer.step = lambda: got.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    )
    m = optimizer_step(
        trainer.policy, trainer.policy_stage, batch, idx, seq_adv, cfg,
        world=trainer.world, device=torch.device("cpu"), pad_id=0, first=True, step=0,
    )  # fmt: skip
    if off_policy:
        assert m["loss/pg_clipfrac"] > 0
        assert m["loss/dual_clipfrac"] > 0 or cfg.algorithm.objective == "psr"
    assert m["loss/pg"] == pytest.approx(want_pg, rel=1e-5, abs=1e-7)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
