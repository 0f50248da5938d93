"""ResRL weights formed inside the on-policy update's own forward (resrl.weights, issue 16): the
group-aligned micro-batch plan, weights equal to the pre-pass's, a whole step equal to the pre-pass
path (padded and packed), the pre-pass skipped when nothing needs it, and the path metrics."""

import pytest
import torch
from small import SMALL_RUN

from resrl.batch import RolloutBatch
from resrl.config import resolve
from resrl.prepass import prepass
from resrl.trainer import Trainer
from resrl.weights import InlineWeights, WeightStats, mixed_groups, plan_weights

SMALL = [
    *SMALL_RUN,
    "model.max_position_embeddings=96",
    "eval.max_problems=4",
    "eval.before=false",
    "sft.steps=2",
    "algorithm.subspace_rank=3",
]


def small_cfg(tmp_path, *extra):
    return resolve("tiny", overrides=[*SMALL, f"run.out_dir={tmp_path}", *extra])


def mixed_batch(trainer, n_prompts=4, seed=0, all_wrong=()):
    """Real prompts with random responses of random lengths; the first half of each group positive,
    except the groups in `all_wrong` (not mixed: no weights)."""
    g = trainer.cfg.rollout.n
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, positive, groups = [], [], [], []
    for slot in range(n_prompts):
        for j in range(g):
            prompts.append(trainer.train_set.prompt_ids[slot])
            length = int(torch.randint(3, 14, (1,), generator=gen))
            responses.append(torch.randint(4, 40, (length,), generator=gen).tolist())
            positive.append(j < g // 2 and slot not in all_wrong)
            groups.append(slot)
    return RolloutBatch.scored(prompts, responses, positive, groups)


def plain_batch(lengths, groups):
    prompts = [[1, 2, 3]] * len(lengths)
    responses = [[5] * n for n in lengths]
    return RolloutBatch.scored(prompts, responses, [True] * len(lengths), groups)


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("max_tokens", [0, 50])
def test_group_micro_batches_cover_every_sequence_once_and_keep_groups_whole(max_tokens):
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 9, (24,), generator=gen).tolist()
    groups = [i // 4 for i in range(24)]
    groups[20:24] = [9] * 4
    lengths[20:24] = [20] * 4  # group 9: 92 tokens with the 3-token prompts: more than 50
    batch = plain_batch(lengths, groups)
    chunks, whole = batch.group_micro_batches(list(range(24)), 6, max_tokens)
    assert sorted(i for c in chunks for i in c) == list(range(24))
    for c in chunks:
        if max_tokens:
            assert sum(batch.length(i) for i in c) <= max_tokens or len(c) == 1
        else:
            assert len(c) <= 6
    for gid in whole:
        holders = [c for c in chunks if any(groups[i] == gid for i in c)]
        assert len(holders) == 1 and sum(groups[i] == gid for i in holders[0]) == 4
    assert whole == ({0, 1, 2, 3, 4} if max_tokens else {0, 1, 2, 3, 4, 9})
    # The plan is the set's, not the order's: the trainer and the update plan independently.
    again, whole_again = batch.group_micro_batches(list(reversed(range(24))), 6, max_tokens)
    assert again == chunks and whole_again == whole


def test_groups_larger_than_a_micro_batch_are_split_and_not_whole():
    batch = plain_batch([3] * 8, [0] * 8)
    chunks, whole = batch.group_micro_batches(list(range(8)), 3)
    assert whole == set() and [len(c) for c in chunks] == [3, 3, 2]


# ----------------------------------------------------------------------------- weights


class Captured(Exception):
    pass


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("layer", ["penultimate", "final"])
def test_inline_weights_equal_the_prepass_weights(tmp_path, packed, layer):
    extra = ["train.pack=true", "train.max_tokens_per_micro_batch=200"] if packed else []
    trainer = Trainer(
        small_cfg(tmp_path, "train.micro_batch_size=8", f"algorithm.subspace_layer={layer}", *extra)
    )
    cfg = trainer.cfg
    batch = mixed_batch(trainer, all_wrong=(2,))
    budget = cfg.train.max_tokens_per_micro_batch if packed else 0
    prepass(
        trainer.policy,
        batch,
        cfg.algorithm,
        temperature=1.0,
        micro_batch_size=cfg.train.micro_batch_size,
        max_tokens=budget,
        pad_id=0,
        seed=11,
        need_old=False,
    )
    expected = batch.token_values.pop("resrl_weight")
    positive, group = batch.positive.tolist(), batch.group.tolist()
    chunks, whole = batch.group_micro_batches(list(range(len(batch))), cfg.train.micro_batch_size, budget)
    assert whole == {0, 1, 2, 3}
    stats = WeightStats()
    inline = InlineWeights(positive, group, mixed_groups(positive, group) & whole, cfg.algorithm, 11, stats)
    assert inline.groups == {0, 1, 3}
    checked = 0
    for mb in chunks:
        t = batch.collate(mb, 0, torch.device("cpu"), packed=packed)
        seen = {}

        def capture(sub_hidden, base_logprob=None, mb=mb, seen=seen):
            lengths = [len(batch.response_ids[i]) for i in mb]
            seen["w"] = inline.weights(mb, sub_hidden, lengths, None)
            raise Captured  # the loss is not needed here

        with torch.no_grad(), pytest.raises(Captured):
            trainer.policy(
                t["input_ids"],
                t.get("attention_mask"),
                position_ids=t.get("position_ids"),
                positions=t["positions"],
                subspace_layer=layer,
                token_loss_fn=capture,
            )
        for row, i in enumerate(mb):
            n = len(batch.response_ids[i])
            torch.testing.assert_close(seen["w"][row, :n], expected[i], atol=1e-6, rtol=0)
            checked += int(not positive[i] and group[i] in inline.groups)
    assert checked == 3 * (cfg.rollout.n // 2)
    assert stats.groups_in_update == 3 and stats.groups_weighted == 3 and stats.neg_tokens > 0
    assert any((expected[i] < 1).any() for i in range(len(batch)))


def test_a_micro_batch_holding_part_of_an_inline_group_is_an_error(tmp_path):
    trainer = Trainer(small_cfg(tmp_path))
    batch = mixed_batch(trainer, n_prompts=2)
    positive, group = batch.positive.tolist(), batch.group.tolist()
    inline = InlineWeights(positive, group, {0, 1}, trainer.cfg.algorithm, 0, WeightStats())
    with pytest.raises(RuntimeError, match="not group-aligned"):
        inline.weights([0, 1], torch.zeros(5, 64), [2, 3], None)


# ----------------------------------------------------------------------------- whole steps


def one_step(tmp_path, name, *extra, batch_seed=0):
    """One train_step on fixed responses; returns (metrics, gradients, pre-pass calls)."""
    trainer = Trainer(small_cfg(tmp_path, f"run.name={name}", *extra))
    trainer.rollout = lambda slots, step: mixed_batch(
        trainer, n_prompts=len(slots), seed=batch_seed, all_wrong=(1,)
    )
    grads, calls = {}, []

    def record():
        for n, p in trainer.model.named_parameters():
            grads[n] = p.grad.detach().clone()

    trainer.optimizer.step = record
    import resrl.trainer as trainer_module

    real = trainer_module.prepass

    def counted(policy, batch, *args, **kwargs):
        forwards = []
        hook = policy.register_forward_pre_hook(lambda *a: forwards.append(1))
        try:
            return real(policy, batch, *args, **kwargs)
        finally:
            hook.remove()
            calls.append(len(forwards))

    trainer_module.prepass = counted
    try:
        metrics = trainer.train_step(0)
    finally:
        trainer_module.prepass = real
    return metrics, grads, calls


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize(
    "layout",
    [
        ["train.micro_batch_size=8"],
        ["train.micro_batch_size=16"],
        ["train.pack=true", "train.max_tokens_per_micro_batch=160"],
    ],
    ids=["padded-2-groups", "padded-4-groups", "packed"],
)
def test_a_whole_step_equals_the_prepass_path(tmp_path, layout):
    m_in, g_in, calls_in = one_step(tmp_path, "inline", *layout)
    m_pre, g_pre, calls_pre = one_step(tmp_path, "prepass", *layout, "algorithm.resrl_weights=prepass")
    # Every mixed group weighed in the update; the pre-pass forwarded nothing.
    assert m_in["resrl/groups_in_update"] == 3 and m_in["resrl/groups_in_prepass"] == 0
    assert m_pre["resrl/groups_in_update"] == 0 and m_pre["resrl/groups_in_prepass"] == 3
    assert calls_in == [0] and calls_pre[0] > 0
    for key in ("resrl/groups_mixed", "resrl/groups_weighted", "resrl/neg_tokens"):
        assert m_in[key] == m_pre[key], key
    for key in ("resrl/neg_weight_mean", "resrl/neg_weight_min_frac", "resrl/distance_mean", "loss/pg"):
        assert m_in[key] == pytest.approx(m_pre[key], rel=1e-5, abs=1e-7), key
    assert g_in.keys() == g_pre.keys()
    for n in g_in:
        torch.testing.assert_close(g_in[n], g_pre[n], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_in.values())


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_groups_too_big_for_a_micro_batch_take_the_prepass(tmp_path):
    # Packed at 60 tokens: some groups fit a micro-batch, the longer ones do not.
    layout = ["train.pack=true", "train.max_tokens_per_micro_batch=60"]
    m_in, g_in, calls_in = one_step(tmp_path, "mixed", *layout)
    m_pre, g_pre, _ = one_step(tmp_path, "prepass", *layout, "algorithm.resrl_weights=prepass")
    assert m_in["resrl/groups_in_update"] >= 1 and m_in["resrl/groups_in_prepass"] >= 1
    assert m_in["resrl/groups_in_update"] + m_in["resrl/groups_in_prepass"] == 3
    assert calls_in[0] > 0
    assert m_in["resrl/neg_weight_mean"] == pytest.approx(m_pre["resrl/neg_weight_mean"], rel=1e-5)
    for n in g_in:
        torch.testing.assert_close(g_in[n], g_pre[n], atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_off_policy_updates_keep_the_prepass(tmp_path):
    m, _, calls = one_step(tmp_path, "off", "train.micro_batch_size=8", "train.mini_batch_prompts=2")
    assert m["resrl/groups_in_update"] == 0 and m["resrl/groups_in_prepass"] == 3 and calls[0] > 0


def test_plan_weights_only_for_on_policy_resrl(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, "train.micro_batch_size=8"))
    batch = mixed_batch(trainer)
    cfg = trainer.cfg
    inline, rest = plan_weights(batch, cfg.algorithm, cfg.train, need_old=False, seed=0, stats=WeightStats())
    assert inline.groups == {0, 1, 2, 3} and rest == set()
    off = plan_weights(batch, cfg.algorithm, cfg.train, need_old=True, seed=0, stats=WeightStats())
    assert off == (None, None)
    grpo = small_cfg(tmp_path, "algorithm.objective=grpo")
    plain = plan_weights(batch, grpo.algorithm, grpo.train, need_old=False, seed=0, stats=WeightStats())
    assert plain == (None, None)
