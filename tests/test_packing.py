"""Packed micro-batches (one row, positions restarting per sequence) against padded ones."""

import pytest
import torch
from small import SMALL_RUN

from resrl.batch import RolloutBatch, balance_groups, pack_sequences, responses_of
from resrl.config import resolve
from resrl.model import build_qwen3, forward_logprobs
from resrl.prepass import prepass
from resrl.trainer import Trainer

SMALL = [
    *SMALL_RUN,
    "data.task_eval_size=4",
    "train.steps=1",
    "train.micro_batch_size=3",
    "eval.max_problems=2",
    "eval.before=false",
]


def random_batch(n=7, seed=0, vocab=50):
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(
            4, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen
        ).tolist()

    prompts = [ids(1, 9) for _ in range(n)]
    responses = [ids(1, 13) for _ in range(n)]
    positive = [i % 2 == 0 for i in range(n)]
    logprobs = [torch.randn(len(r), generator=gen) for r in responses]
    return RolloutBatch.scored(prompts, responses, positive, [i // 4 for i in range(n)], logprobs)


@pytest.fixture
def model():
    return build_qwen3(
        50, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=1
    )


def _run(model, batch, packed):
    idx = list(range(len(batch)))
    t = batch.collate(idx, 0, torch.device("cpu"), packed=packed)
    model.zero_grad()
    out = forward_logprobs(
        model,
        t["input_ids"],
        t.get("attention_mask"),
        position_ids=t.get("position_ids"),
        return_entropy=True,
        subspace_layer="penultimate",
    )
    lp, ent = responses_of(out["logprob"], t), responses_of(out["entropy"], t)
    coef = torch.linspace(-1, 1, lp.numel()).view_as(lp)
    (torch.where(t["resp_mask"], lp * coef + 0.1 * ent, 0.0)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return t, lp, ent, responses_of(out["sub_hidden"], t), grads


def test_packed_equals_padded_logprobs_hidden_and_gradients(model):
    batch = random_batch()
    t_pad, lp_pad, ent_pad, h_pad, g_pad = _run(model, batch, packed=False)
    t_pack, lp_pack, ent_pack, h_pack, g_pack = _run(model, batch, packed=True)
    assert t_pack["input_ids"].shape[0] == 1 and "attention_mask" not in t_pack
    assert t_pack["input_ids"].shape[1] == sum(
        len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)
    )
    mask = t_pad["resp_mask"]
    assert torch.equal(mask, t_pack["resp_mask"])
    torch.testing.assert_close(lp_pack[mask], lp_pad[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent_pack[mask], ent_pad[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h_pack[mask], h_pad[mask], atol=2e-5, rtol=1e-5)
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], atol=2e-5, rtol=1e-4, msg=name)


def test_packing_really_separates_sequences(model):
    # Without restarting positions the second sequence would attend to the first and differ.
    batch = random_batch(n=2, seed=3)
    t = batch.collate([0, 1], 0, torch.device("cpu"), packed=True)
    joined = forward_logprobs(model, t["input_ids"], torch.ones_like(t["input_ids"]))["logprob"]
    packed = forward_logprobs(model, t["input_ids"], None, position_ids=t["position_ids"])["logprob"]
    second = responses_of(packed, t)[1][t["resp_mask"][1]]
    assert not torch.allclose(responses_of(joined, t)[1][t["resp_mask"][1]], second, atol=1e-3)


def test_token_budget_micro_batches():
    batch = random_batch(n=9, seed=5)
    lengths = {i: len(batch.prompt_ids[i]) + len(batch.response_ids[i]) for i in range(9)}
    chunks = batch.micro_batches(list(range(9)), size=2, max_tokens=20)
    assert sorted(i for c in chunks for i in c) == list(range(9))
    for c in chunks:
        assert sum(lengths[i] for i in c) <= 20 or len(c) == 1
    assert [len(c) for c in batch.micro_batches(list(range(9)), size=2)] == [2, 2, 2, 2, 1]


def test_pack_sequences_layout():
    ids, pos, starts = pack_sequences([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 10, 7, 11]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # Position 1 (token 6) scores the first response token 8; position 5 (token 7) scores 11.
    assert starts == [1, 5]
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        pack_sequences([[]], [[1]], pad_id=0)


def test_forward_logprobs_packed_needs_positions(model):
    with pytest.raises(ValueError, match="attention_mask=None \\(packed rows\\) needs position_ids"):
        forward_logprobs(model, torch.ones(1, 5, dtype=torch.long), None)


def test_prepass_packed_equals_padded(tmp_path):
    cfg = resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", "algorithm.subspace_rank=2"])
    trainer = Trainer(cfg)
    values = []
    for max_tokens in (0, 40):
        batch = random_batch(n=8, seed=2)
        prepass(
            trainer.policy,
            batch,
            cfg.algorithm,
            temperature=1.0,
            micro_batch_size=3,
            pad_id=0,
            max_tokens=max_tokens,
            seed=1,
            need_old=True,
        )
        values.append({k: torch.cat(v) for k, v in batch.token_values.items()})
    assert (values[0]["resrl_weight"] < 1).any()
    for key in values[0]:
        torch.testing.assert_close(values[1][key], values[0][key], atol=2e-5, rtol=1e-5, msg=key)


def test_packed_training_gives_the_padded_gradient(tmp_path):
    grads = []
    for pack in ("false", "true"):
        cfg = resolve(
            "tiny",
            overrides=[
                *SMALL,
                f"run.out_dir={tmp_path}",
                f"run.name={pack}",
                f"train.pack={pack}",
                "train.max_tokens_per_micro_batch=60",
            ],
        )
        trainer = Trainer(cfg)
        batch = random_batch(n=8, seed=4)
        batch.group = torch.tensor([i // 4 for i in range(8)])
        prepass(
            trainer.policy,
            batch,
            cfg.algorithm,
            temperature=1.0,
            micro_batch_size=3,
            pad_id=0,
            seed=0,
            need_old=False,
        )
        recorded = {}
        trainer.optimizer.step = lambda rec=recorded, tr=trainer: rec.update(
            {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        )
        with pytest.warns(UserWarning, match="optimizer.step"):
            trainer.update(batch, torch.linspace(-1, 1, 8), step=0)
        grads.append(recorded)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=2e-6, rtol=1e-4, msg=name)


def test_packed_run_end_to_end(tmp_path):
    cfg = resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", "train.pack=true"])
    summary = Trainer(cfg).fit()
    assert "pass@1" in summary["eval_after"]


def test_balance_groups_even_counts_balanced_tokens_order_kept():
    tokens = [100, 10, 90, 20, 30, 80, 15, 5]
    groups = [6, 0, 3, 5, 1, 2, 4, 7]
    split = balance_groups(tokens, groups, 2)
    assert sorted(g for part in split for g in part) == sorted(groups)
    assert [len(part) for part in split] == [4, 4]
    loads = [sum(tokens[g] for g in part) for part in split]
    assert sorted(loads) == [165, 185]  # greedy; a strided split gives 75 vs 275
    strided = [groups[0::2], groups[1::2]]
    assert max(loads) < max(sum(tokens[g] for g in part) for part in strided)
    for part in split:  # each rank's groups in the order they had
        assert part == [g for g in groups if g in part]
    assert balance_groups(tokens, groups, 2) == split  # deterministic: every rank computes it
    assert balance_groups(tokens, groups, 1) == [groups]
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        balance_groups(tokens, groups, 3)


def test_select_and_concat_keep_sequences_and_token_values():
    batch = random_batch(n=6)
    batch.token_values["resrl_weight"] = [torch.rand(len(r)) for r in batch.response_ids]
    parts = [batch.select([4, 5]), batch.select([0, 1, 2, 3])]
    joined = RolloutBatch.concat(parts)
    order = [4, 5, 0, 1, 2, 3]
    assert joined.response_ids == [batch.response_ids[i] for i in order]
    assert torch.equal(joined.group, batch.group[order])
    assert torch.equal(joined.rewards, batch.rewards[order])
    for a, i in zip(joined.token_values["resrl_weight"], order, strict=True):
        assert torch.equal(a, batch.token_values["resrl_weight"][i])
