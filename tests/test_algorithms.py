"""Advantages, objectives, the clipped surrogate and ResRL token weights (ALGORITHMS.md §2-§4)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.reference import (
    residual_weights_reference,
    subspace_basis_reference,
    subspace_residual_reference,
)
from resrl.algorithms import (
    ace_advantages,
    group_advantages,
    group_seed,
    kl_penalty,
    policy_loss,
    resrl_token_weights,
    token_advantages,
)


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")


# --------------------------------------------------------------------------- advantages

# Groups interleaved and with sparse ids: 7 = {1, 0, 0, 1}, 3 = {1} (group of one), 5 = {0, 0, 0}.
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
GROUPS = torch.tensor([7, 3, 7, 5, 7, 7, 5, 5])


def test_grpo_advantages_hand_computed():
    adv = group_advantages(REWARDS, GROUPS, "grpo")
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    want = torch.tensor([a, 0.0, -a, 0.0, -a, a, 0.0, 0.0])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)


def test_grpo_all_equal_nonzero_rewards_give_zero():
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, -1.0]), torch.tensor([0, 0, 0, 1]), "grpo")
    torch.testing.assert_close(adv, torch.zeros(4), atol=1e-9, rtol=0)


def test_drgrpo_advantages_hand_computed():
    adv = group_advantages(REWARDS, GROUPS, "drgrpo")
    want = torch.tensor([0.5, 0.0, -0.5, 0.0, -0.5, 0.5, 0.0, 0.0])
    torch.testing.assert_close(adv, want, atol=1e-7, rtol=0)


def test_reinforce_advantages_use_positive():
    positive = torch.tensor([True, False, False, True, False, True, False, False])
    adv = group_advantages(REWARDS, GROUPS, "reinforce", positive)
    assert adv.tolist() == [1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0]
    # Without `positive`, positives are rewards > 0 (ResRL's -1 convention included).
    adv = group_advantages(torch.tensor([1.0, -1.0, 0.7]), torch.tensor([0, 0, 1]), "reinforce")
    assert adv.tolist() == [1.0, -1.0, 1.0]


def test_advantages_are_invariant_to_batch_order():
    perm = torch.tensor([5, 2, 7, 0, 3, 1, 6, 4])
    for kind in ("grpo", "drgrpo"):
        full = group_advantages(REWARDS, GROUPS, kind)
        torch.testing.assert_close(group_advantages(REWARDS[perm], GROUPS[perm], kind), full[perm])


@pytest.mark.parametrize(
    "rewards, groups, kind, err",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), "grpo", ValueError),
        (torch.tensor([1.0, 0.0]), torch.tensor([0]), "grpo", ValueError),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), "ppo", ValueError),
        (torch.tensor([1, 0]), torch.tensor([0, 0]), "grpo", TypeError),
        (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), "grpo", TypeError),
    ],
    ids=["nan", "length", "kind", "int-rewards", "float-groups"],
)
def test_advantages_reject_bad_input(rewards, groups, kind, err):
    with pytest.raises(err):
        group_advantages(rewards, groups, kind)


# --------------------------------------------------------------------------- objectives

SEQ_ADV = torch.tensor([0.5, -0.5, 1.0, -1.0])
POSITIVE = torch.tensor([True, False, True, False])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
WEIGHT = torch.tensor([[0.3, 0.3, 0.3], [0.1, 0.55, 0.9], [1.0, 1.0, 1.0], [1.0, 0.2, 0.4]])


def test_objective_grpo():
    adv, mask = token_advantages("grpo", SEQ_ADV, POSITIVE, MASK)
    want = torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0], [1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    torch.testing.assert_close(adv, want)
    assert torch.equal(mask, MASK)


def test_objective_psr_drops_negatives():
    adv, mask = token_advantages("psr", SEQ_ADV, POSITIVE, MASK)
    assert torch.equal(mask, MASK & POSITIVE[:, None])
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]]))


def test_objective_nsr_drops_positives():
    adv, mask = token_advantages("nsr", SEQ_ADV, POSITIVE, MASK)
    assert torch.equal(mask, MASK & ~POSITIVE[:, None])
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0, 0], [-1, -1, 0], [0, 0, 0], [-1, -1, -1]]))


def test_objective_w_reinforce():
    adv, mask = token_advantages("w_reinforce", SEQ_ADV, POSITIVE, MASK, w_lambda=0.1)
    want = torch.tensor([[0.1, 0.1, 0.1], [-1.0, -1.0, 0.0], [0.1, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    torch.testing.assert_close(adv, want)
    assert torch.equal(mask, MASK)


def test_objective_resrl():
    adv, mask = token_advantages("resrl", SEQ_ADV, POSITIVE, MASK, WEIGHT, pos_scale=0.1)
    # positives: 0.1 * A (weights ignored); negatives: w * A; padding 0.
    want = torch.tensor([[0.05, 0.05, 0.05], [-0.05, -0.275, 0.0], [0.1, 0.0, 0.0], [-1.0, -0.2, -0.4]])
    torch.testing.assert_close(adv, want)
    assert torch.equal(mask, MASK)


def test_resrl_with_unit_weights_and_scale_equals_grpo():
    torch.manual_seed(1)
    rewards = (torch.rand(8) > 0.5).float()
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    seq_adv = group_advantages(rewards, groups, "grpo")
    mask = torch.rand(8, 5) > 0.2
    ones = torch.ones(8, 5)
    a_grpo, m_grpo = token_advantages("grpo", seq_adv, rewards > 0, mask)
    a_resrl, m_resrl = token_advantages("resrl", seq_adv, rewards > 0, mask, ones, pos_scale=1.0)
    assert torch.equal(a_grpo, a_resrl) and torch.equal(m_grpo, m_resrl)
    lp = torch.randn(8, 5).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(8, 5)
    loss_g, _ = policy_loss(lp, old, a_grpo, m_grpo)
    (grad_g,) = torch.autograd.grad(loss_g, lp)
    loss_r, _ = policy_loss(lp, old, a_resrl, m_resrl)
    (grad_r,) = torch.autograd.grad(loss_r, lp)
    assert torch.equal(loss_g, loss_r) and torch.equal(grad_g, grad_r)


def test_objectives_reject_bad_input():
    with pytest.raises(ValueError, match="resrl_weight"):
        token_advantages("resrl", SEQ_ADV, POSITIVE, MASK)
    with pytest.raises(ValueError, match="objective"):
        token_advantages("dapo", SEQ_ADV, POSITIVE, MASK)
    with pytest.raises(ValueError, match="resrl_weight"):
        token_advantages("resrl", SEQ_ADV, POSITIVE, MASK, WEIGHT[:, :2])
    with pytest.raises(TypeError, match="mask"):
        token_advantages("grpo", SEQ_ADV, POSITIVE, MASK.float())


# --------------------------------------------------------------------------- clipped surrogate

# (advantage, ratio, eps_high, expected loss, expected d loss / d logprob, clipped, dual-clipped)
CLIP_CASES = {
    "pos-adv-ratio-above-clip": (1.0, 1.5, 0.2, -1.2, 0.0, True, False),
    "pos-adv-ratio-below-clip": (1.0, 0.5, 0.2, -0.5, -0.5, False, False),
    "pos-adv-inside-clip-higher": (1.0, 1.25, 0.28, -1.25, -1.25, False, False),
    "pos-adv-huge-ratio-no-dual": (1.0, 5.0, 0.2, -1.2, 0.0, True, False),
    "neg-adv-ratio-above-clip": (-1.0, 1.5, 0.2, 1.5, 1.5, False, False),
    "neg-adv-ratio-below-clip": (-1.0, 0.5, 0.2, 0.8, 0.0, True, False),
    "neg-adv-dual-clip": (-1.0, 5.0, 0.2, 3.0, 0.0, False, True),
    "neg-half-adv-dual-clip": (-0.5, 4.0, 0.2, 1.5, 0.0, False, True),
}


@pytest.mark.parametrize("case", list(CLIP_CASES), ids=list(CLIP_CASES))
def test_policy_loss_clip_hand_computed(case):
    a, ratio, eps_high, want_loss, want_grad, clipped, dual = CLIP_CASES[case]
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64).float().requires_grad_()
    old = torch.zeros(1, 1)
    loss, metrics = policy_loss(
        lp, old, torch.tensor([[a]]), torch.ones(1, 1, dtype=torch.bool), eps_high=eps_high
    )
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)
    assert grad.item() == pytest.approx(want_grad, abs=1e-6)
    assert metrics["pg_clipfrac"] == float(clipped)
    assert metrics["dual_clipfrac"] == float(dual)
    assert metrics["ratio_mean"] == pytest.approx(ratio, rel=1e-6)


def test_policy_loss_dual_clip_disabled():
    lp = torch.tensor([[math.log(5.0)]]).requires_grad_()
    loss, _ = policy_loss(
        lp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1, dtype=torch.bool), dual_clip=None
    )
    assert loss.item() == pytest.approx(5.0, rel=1e-6)


def test_policy_loss_on_policy_ratio_is_one_with_gradient():
    torch.manual_seed(0)
    lp = torch.randn(3, 4).requires_grad_()
    adv = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, metrics = policy_loss(lp, None, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    n = mask.sum()
    torch.testing.assert_close(loss, -(adv * mask).sum() / n)
    torch.testing.assert_close(grad, -adv * mask / n)
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["approx_kl"] == 0.0
    assert metrics["pg_clipfrac"] == 0.0 and metrics["valid_tokens"] == 8.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_policy_loss_clamps_log_ratio():
    lp = torch.tensor([[0.0]]).requires_grad_()
    loss, metrics = policy_loss(
        lp,
        torch.tensor([[-1000.0]]),
        torch.tensor([[-1.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        dual_clip=None,
    )
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def _random_batch(seed: int, b: int = 8, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 3, 0, 5, 6, 2, 4])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    lp = -torch.rand(b, t, generator=g) * 3
    old = lp + 0.3 * torch.randn(b, t, generator=g)
    ref = lp + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g) * 2
    return lp, old, ref, adv, mask, ent


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("micro", [1, 4], ids=["8x1", "2x4"])
def test_policy_loss_micro_batches_sum_to_full_batch(agg, micro):
    lp, old, ref, adv, mask, ent = _random_batch(0)
    kw = dict(agg=agg, ref_logprob=None, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, eps_high=0.28)
    lp_full = lp.clone().requires_grad_()
    ent_full = ent.clone().requires_grad_()
    loss_full, _ = policy_loss(lp_full, old, adv, mask, **{**kw, "ref_logprob": ref}, entropy=ent_full)
    g_lp_full, g_ent_full = torch.autograd.grad(loss_full, (lp_full, ent_full))

    token_count = float(mask.sum())
    seq_count = float(mask.any(1).sum())
    lp_mb = lp.clone().requires_grad_()
    ent_mb = ent.clone().requires_grad_()
    total = torch.zeros(())
    for s in range(0, 8, micro):
        sl = slice(s, s + micro)
        loss, _ = policy_loss(
            lp_mb[sl], old[sl], adv[sl], mask[sl], **{**kw, "ref_logprob": ref[sl]}, entropy=ent_mb[sl],
            token_count=token_count, seq_count=seq_count, norm_len=mask.shape[1],
        )  # fmt: skip
        total = total + loss
    g_lp_mb, g_ent_mb = torch.autograd.grad(total, (lp_mb, ent_mb))
    torch.testing.assert_close(total, loss_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_lp_mb, g_lp_full, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_ent_mb, g_ent_full, atol=1e-7, rtol=1e-6)


def test_aggregation_modes_hand_computed():
    # On-policy, so the per-token loss is -A exactly.
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    lp = torch.zeros(3, 3)
    tm, _ = policy_loss(lp, None, adv, mask, agg="token-mean")
    assert tm.item() == pytest.approx(-10.0 / 4)
    sm, _ = policy_loss(lp, None, adv, mask, agg="seq-mean-token-mean")
    assert sm.item() == pytest.approx(-(2.0 + 4.0) / 2)
    sn, _ = policy_loss(lp, None, adv, mask, agg="seq-mean-token-sum-norm", norm_len=5)
    assert sn.item() == pytest.approx(-(6.0 + 4.0) / (5 * 2))


def test_kl_estimators_hand_values():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(2.0)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(r, rel=1e-6)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * r * r, rel=1e-6)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + r - 1.0, rel=1e-6)
    # k3 on the other side: log pi_ref - log pi = +log 2 -> e^{log 2} - log 2 - 1.
    assert kl_penalty(ref, lp, "k3").item() == pytest.approx(2.0 - r - 1.0, rel=1e-6)


@pytest.mark.parametrize(
    "kind, want", [("k1", math.log(2.0)), ("k2", 0.5 * math.log(2.0) ** 2), ("k3", math.log(2.0) - 0.5)]
)
def test_policy_loss_kl_term(kind, want):
    lp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = policy_loss(lp, None, torch.zeros(1, 2), mask, ref_logprob=ref, kl_coef=0.1, kl_kind=kind)
    assert loss.item() == pytest.approx(0.1 * want, rel=1e-5)
    assert metrics["kl"] == pytest.approx(want, rel=1e-5)


def test_policy_loss_entropy_bonus():
    ent = torch.tensor([[1.0, 3.0, 100.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, metrics = policy_loss(
        torch.zeros(1, 3), None, torch.zeros(1, 3), mask, entropy=ent, entropy_coef=0.5
    )
    assert loss.item() == pytest.approx(-0.5 * 2.0)
    assert metrics["entropy"] == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25, 0.0]]))


def test_policy_loss_non_finite_padding_gives_finite_gradient():
    lp = torch.tensor([[-0.5, -float("inf")]]).requires_grad_()
    old = torch.tensor([[-0.4, float("nan")]])
    ref = torch.tensor([[-0.3, float("nan")]])
    ent = torch.tensor([[1.0, float("inf")]]).requires_grad_()
    mask = torch.tensor([[True, False]])
    kw = dict(ref_logprob=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.1)
    loss, metrics = policy_loss(lp, old, torch.tensor([[1.0, float("nan")]]), mask, **kw)
    grads = torch.autograd.grad(loss, (lp, ent))
    assert math.isfinite(loss.item()) and all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0, 1] == 0 and all(math.isfinite(v) for v in metrics.values())


def test_policy_loss_all_masked_is_zero_not_nan():
    lp = torch.randn(2, 3).requires_grad_()
    loss, metrics = policy_loss(lp, None, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and metrics["ratio_max"] == 0.0 and metrics["valid_tokens"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"agg": "token-sum"}, "agg"),
        ({"kl_kind": "k4"}, "kl_kind"),
        ({"kl_coef": 0.1}, "ref_logprob"),
        ({"entropy_coef": 0.1}, "entropy"),
        ({"token_count": 0.0}, "token_count"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"eps_low": 1.0}, "eps_low"),
    ],
    ids=["agg", "kl-kind", "kl-no-ref", "entropy-missing", "zero-count", "dual-clip", "eps-low"],
)
def test_policy_loss_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match="adv"):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- ResRL token weights

D = 16


def _tokens(g: torch.Generator, n: int, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(n, D, generator=g) + offset


def _build_groups(seed: int = 0):
    """Groups (id: positive tokens, negative tokens) covering every branch of §4.

    Positive pools have at most 11 tokens with rank 64, D = 16: k = |P| - 1 and the randomized
    range finder spans the whole pool, so the fast basis equals the exact SVD up to rounding.
    """
    g = torch.Generator().manual_seed(seed)
    spec = {
        10: (8, 12),  # eligible
        20: (5, 7),  # eligible, small pool
        -3: (11, 9),  # eligible, negative id
        30: (0, 6),  # no positive: weight 1
        40: (3, 5),  # < 4 positive tokens: weight 1
        50: (6, 0),  # no negative: nothing to weight
    }
    hidden, group, positive = [], [], []
    for gid, (n_pos, n_neg) in spec.items():
        hidden += [_tokens(g, n_pos, 0.5), _tokens(g, n_neg)]
        group += [torch.full((n_pos + n_neg,), gid)]
        positive += [torch.ones(n_pos, dtype=torch.bool), torch.zeros(n_neg, dtype=torch.bool)]
    # Group 60: every negative token identical -> equal distances -> (1 + xi) / 2.
    same = _tokens(g, 1).expand(4, D)
    hidden += [_tokens(g, 6), same]
    group += [torch.full((10,), 60)]
    positive += [torch.ones(6, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)]
    return torch.cat(hidden), torch.cat(group), torch.cat(positive)


def _direct_weights(hidden, group, positive, min_weight=0.1):
    """§4 from kernels.reference in float64, one group at a time (exact SVD)."""
    want = torch.ones(hidden.shape[0], dtype=torch.float64)
    for gid in torch.unique(group).tolist():
        pos = (group == gid) & positive
        neg = (group == gid) & ~positive
        if pos.sum() < 4 or neg.sum() == 0:
            continue
        basis, mean = subspace_basis_reference(hidden[pos].double(), rank=64)
        dist = subspace_residual_reference(hidden[neg].double(), basis, mean)
        zeros = torch.zeros(int(neg.sum()), dtype=torch.long)
        w = residual_weights_reference(
            dist, zeros, torch.ones_like(zeros, dtype=torch.bool), min_weight=min_weight
        )
        want[neg] = w.double()
    return want


def test_resrl_weights_match_direct_reference():
    hidden, group, positive = _build_groups()
    # Interleave the groups' tokens across the batch; order within each group is irrelevant here.
    perm = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(3))
    hidden, group, positive = hidden[perm], group[perm], positive[perm]
    got = resrl_token_weights(hidden, group, positive)
    want = _direct_weights(hidden, group, positive)
    assert got.dtype == torch.float32 and got.shape == (hidden.shape[0],)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    # The branches, checked directly.
    assert (got[positive] == 1).all()
    for gid in (30, 40, 50):
        assert (got[group == gid] == 1).all()
    torch.testing.assert_close(got[(group == 60) & ~positive], torch.full((4,), 0.55))
    for gid in (10, 20, -3):
        w = got[(group == gid) & ~positive]
        assert w.min() == pytest.approx(0.1) and w.max() == pytest.approx(1.0) and (w < 1).any()


def test_resrl_weights_min_pos_tokens_and_min_weight():
    hidden, group, positive = _build_groups()
    got = resrl_token_weights(hidden, group, positive, min_pos_tokens=6, min_weight=0.2)
    # Group 20 has 5 positive tokens: skipped at min_pos_tokens=6.
    assert (got[group == 20] == 1).all()
    w = got[(group == 10) & ~positive]
    assert w.min() == pytest.approx(0.2)
    torch.testing.assert_close(got[(group == 60) & ~positive], torch.full((4,), 0.6))


def test_resrl_weights_reproducible_and_independent_of_group_order():
    # Subsampling active (pool 10 > max_tokens 6) and k = rank = 3 < pool: the seed matters.
    g = torch.Generator().manual_seed(5)
    blocks = []
    for gid in range(4):
        hid = torch.randn(16, D, generator=g)
        pos = torch.arange(16) < 10
        blocks.append((hid, torch.full((16,), 100 + gid), pos))
    kw = dict(rank=3, max_tokens=6, seed=11)

    def run(order):
        hid, grp, pos = (torch.cat([blocks[i][j] for i in order]) for j in range(3))
        return resrl_token_weights(hid, grp, pos, **kw).split(16)

    base = run([0, 1, 2, 3])
    again = run([0, 1, 2, 3])
    shuffled = run([2, 0, 3, 1])
    for i in range(4):
        assert torch.equal(base[i], again[i])
    for pos_in_batch, i in enumerate([2, 0, 3, 1]):
        torch.testing.assert_close(shuffled[pos_in_batch], base[i], atol=1e-5, rtol=0)
    # A batch holding only some of the groups: each group's weights do not change.
    subset = run([3, 1])
    torch.testing.assert_close(subset[0], base[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(subset[1], base[1], atol=1e-5, rtol=0)
    other_seed = resrl_token_weights(
        *(torch.cat([b[j] for b in blocks]) for j in range(3)), rank=3, max_tokens=6, seed=12
    )
    assert not torch.allclose(other_seed, torch.cat(base), atol=1e-3)


def test_group_seed_distinct():
    seeds = {group_seed(s, gid) for s in range(4) for gid in range(-50, 50)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)


def test_resrl_weights_edge_cases_and_bad_input():
    empty = resrl_token_weights(
        torch.zeros(0, D), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    )
    assert empty.shape == (0,)
    hidden = torch.randn(5, D)
    none_eligible = resrl_token_weights(
        hidden, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool)
    )
    assert torch.equal(none_eligible, torch.ones(5))
    with pytest.raises(ValueError, match="token_group"):
        resrl_token_weights(hidden, torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_pos_tokens"):
        resrl_token_weights(
            hidden, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool), min_pos_tokens=1
        )
    with pytest.raises(TypeError, match="token_positive"):
        resrl_token_weights(hidden, torch.zeros(5, dtype=torch.long), torch.zeros(5))


# --------------------------------------------------------------------------- ACE (§6)


def test_ace_scales_only_negative_advantages_by_the_confidence_shift():
    adv = torch.tensor([1.5, -0.5, -1.0, 0.0, -2.0])
    lp = torch.tensor([-3.0, -2.0, -10.0, -1.0, -4.0])
    ref = torch.tensor([-4.0, -3.0, -8.0, -1.0, -4.0])
    out, shift = ace_advantages(adv, lp, ref, alpha=0.5)
    torch.testing.assert_close(shift, lp - ref)
    softplus = [math.log1p(math.exp(c)) for c in (lp - ref).tolist()]
    expected = [
        1.5,
        -0.5 * (1 + 0.5 * softplus[1]),
        -1.0 * (1 + 0.5 * softplus[2]),
        0.0,
        -2.0 * (1 + 0.5 * math.log(2)),
    ]
    torch.testing.assert_close(out, torch.tensor(expected))
    # An overconfident error (shift +1) is pushed down harder than an underconfident one (-2).
    assert out[1] / adv[1] > out[2] / adv[2] > 1
    same, _ = ace_advantages(adv, lp, ref, alpha=0.0)
    torch.testing.assert_close(same, adv)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -1.0}, "alpha must be a number >= 0"),
        ({"seq_logprob": torch.zeros(2)}, "need the same length"),
        ({"seq_ref_logprob": torch.tensor([0.0, float("-inf"), 0.0])}, "not finite"),
    ],
)
def test_ace_rejects_bad_inputs(kwargs, match):
    args = {
        "seq_adv": torch.zeros(3),
        "seq_logprob": torch.zeros(3),
        "seq_ref_logprob": torch.zeros(3),
        "alpha": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ace_advantages(args.pop("seq_adv"), args.pop("seq_logprob"), args.pop("seq_ref_logprob"), **args)
