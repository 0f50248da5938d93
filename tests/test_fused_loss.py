"""kernels.linear_logprob_loss against its reference (full logits in float64, then the same token
loss) and against `linear_logprob` + the loss through autograd: the loss, the detached log-probs
and entropies, and both gradients, with the trainer's own per-token loss (`PolicyTokenLoss`) in
every aggregation mode, clipping and dual clip active, KL and entropy terms, truncated IS, chunk
boundaries inside a sequence, N = 1, and the Triton path (on CUDA, or under the interpreter on the CPU:
the `device` fixture of tests/conftest.py)."""

import pytest
import torch

import kernels
import kernels.fused_loss as fused_loss
from kernels.fused_loss import linear_logprob_loss_reference
from resrl.algorithms import AGG_MODES, PolicyTokenLoss, aggregation_weights, policy_loss

# fp32 kernel against a float64 oracle; stated once (fp32 dots are IEEE on CUDA too).
TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 inputs against a float64 oracle on the same rounded inputs, relative to the largest
# magnitude (as for `linear_logprob`, whose kernels the Triton path runs, tests/test_linear_logprob.py).
BF16_REL_TOL = 2e-2


def problem(
    lengths, d=24, v=77, seed=0, off_policy=True, with_ref=True, agg="token-mean", device="cpu",
    w_scale=0.5, **loss_kw,
):  # fmt: skip
    """Hidden states, LM head, targets and a PolicyTokenLoss over sequences of `lengths` tokens, on
    `device` (drawn on the CPU: the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    m = sum(lengths)
    hidden = torch.randn(m, d, generator=gen).to(device)
    weight = (torch.randn(v, d, generator=gen) * w_scale).to(device)
    target = torch.randint(0, v, (m,), generator=gen).to(device)
    b, t = len(lengths), max(lengths)
    mask_BT = torch.arange(t, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    seq_adv = torch.linspace(-1.5, 1.0, b) if b > 1 else torch.tensor([-1.2])
    adv_BT = torch.where(mask_BT, seq_adv.to(device)[:, None], 0.0)
    # Global divisors larger than this batch, as in one micro-batch of a mini-batch.
    weight_BT = aggregation_weights(mask_BT, agg, m + 7.0, b + 2.0, float(t + 3))
    with torch.no_grad():
        lp_now, _ = kernels.linear_logprob(hidden, weight, target)
    # Stale log-probs far enough off for both clip branches and the dual clip to be active.
    old = lp_now + 1.5 * torch.randn(m, generator=gen).to(device) if off_policy else None
    ref = lp_now + 0.3 * torch.randn(m, generator=gen).to(device) if with_ref else None
    sample = lp_now + 0.5 * torch.randn(m, generator=gen).to(device)
    token_loss = PolicyTokenLoss(
        adv_BT[mask_BT],
        weight_BT[mask_BT],
        old_logprob=old,
        ref_logprob=ref,
        sample_logprob=sample,
        **loss_kw,
    )
    layout = {"mask": mask_BT, "adv": adv_BT, "old": old, "ref": ref, "weight": weight_BT}
    return hidden, weight, target, token_loss, layout


def run(fn, hidden, weight, target, token_loss, dtype=torch.float32, **kw):
    h = hidden.detach().to(dtype).clone().requires_grad_()
    w = weight.detach().to(dtype).clone().requires_grad_()
    loss, lp, ent = fn(h, w, target, token_loss, **kw)
    loss.backward()
    return loss.detach(), lp, ent, h.grad, w.grad


def assert_matches_reference(hidden, weight, target, token_loss, *, temperature=1.0, with_entropy=True):
    got = run(kernels.linear_logprob_loss, hidden, weight, target, token_loss,
              temperature=temperature, with_entropy=with_entropy)  # fmt: skip
    want = run(linear_logprob_loss_reference, hidden, weight, target, token_loss, dtype=torch.float64,
               temperature=temperature, with_entropy=with_entropy)  # fmt: skip
    names = ("loss", "logprob", "entropy", "grad_hidden", "grad_weight")
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b, **TOL, msg=name)
    assert not got[1].requires_grad and (got[2] is None or not got[2].requires_grad)
    return got


CASES = {
    "on-policy": dict(off_policy=False),
    "clip-and-dual-clip": dict(),
    "no-dual-clip": dict(dual_clip=None),
    "clip-higher": dict(eps_high=0.28),
    "kl-k1": dict(kl_coef=0.3, kl_kind="k1"),
    "kl-k2": dict(kl_coef=0.3, kl_kind="k2"),
    "kl-k3-entropy": dict(kl_coef=0.3, kl_kind="k3", entropy_coef=0.05),
    "entropy-only": dict(entropy_coef=0.1, off_policy=False),
    "tis": dict(tis_cap=1.5),
    "tis-on-policy": dict(tis_cap=2.0, off_policy=False),
}


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_matches_the_reference(case, agg, monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    # Chunks of 5 tokens: boundaries fall inside sequences of 7, 3, 11 and 1 tokens.
    monkeypatch.setattr(fused_loss, "chunk_rows", lambda n, v: 5)
    hidden, weight, target, token_loss, _ = problem([7, 3, 11, 1], agg=agg, **CASES[case])
    got = assert_matches_reference(hidden, weight, target, token_loss, temperature=0.8)
    assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0


def test_the_cases_exercise_clipping_and_dual_clip():
    _, _, _, _, layout = problem([7, 3, 11, 1])
    hidden, weight, target, token_loss, layout = problem([7, 3, 11, 1])
    mask = layout["mask"]
    with torch.no_grad():
        lp, _ = kernels.linear_logprob(hidden, weight, target)
    lp_BT = torch.zeros(mask.shape).masked_scatter(mask, lp)
    old_BT = torch.zeros(mask.shape).masked_scatter(mask, layout["old"])
    _, m = policy_loss(lp_BT, old_BT, layout["adv"], mask)
    assert m["pg_clipfrac"] > 0.1 and m["dual_clipfrac"] > 0.05


@pytest.mark.parametrize("agg", AGG_MODES)
def test_token_loss_over_any_chunks_is_policy_loss(agg):
    """The per-token form sums to `policy_loss` (value and gradients), however the tokens are cut."""
    kw = dict(eps_high=0.28, kl_coef=0.2, entropy_coef=0.03)
    _, _, _, token_loss, lay = problem([4, 9, 2, 6], agg=agg, **kw)
    mask = lay["mask"]
    gen = torch.Generator().manual_seed(3)
    lp = (-torch.rand(int(mask.sum()), generator=gen) * 3).requires_grad_()
    ent = (torch.rand(int(mask.sum()), generator=gen) * 2).requires_grad_()
    total = sum(token_loss(lp[s : s + 4], ent[s : s + 4], slice(s, s + 4)) for s in range(0, lp.shape[0], 4))
    g_lp, g_ent = torch.autograd.grad(total, [lp, ent])

    def layout(x):
        return torch.zeros(mask.shape, dtype=x.dtype).masked_scatter(mask, x)

    lp2, ent2 = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    b, t = mask.shape
    want, _ = policy_loss(
        layout(lp2), layout(lay["old"]), lay["adv"], mask, agg=agg,
        token_count=float(mask.sum()) + 7.0, seq_count=b + 2.0, norm_len=t + 3,
        ref_logprob=layout(lay["ref"]), entropy=layout(ent2), **kw,
    )  # fmt: skip
    w_lp, w_ent = torch.autograd.grad(want, [lp2, ent2])
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_lp, w_lp, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(g_ent, w_ent, atol=1e-7, rtol=1e-5)


def test_equals_linear_logprob_then_the_loss(monkeypatch):
    """Against the update's former path: `linear_logprob`, then the loss through autograd."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    hidden, weight, target, token_loss, _ = problem([6, 13, 2], kl_coef=0.1, entropy_coef=0.02)

    def composed(h, w, tgt, fn, *, temperature, with_entropy):
        lp, ent = kernels.linear_logprob(h, w, tgt, temperature=temperature, return_entropy=with_entropy)
        return fn(lp, ent, slice(0, h.shape[0])), lp.detach(), ent.detach()

    got = run(
        kernels.linear_logprob_loss, hidden, weight, target, token_loss, temperature=1.3, with_entropy=True
    )
    want = run(composed, hidden, weight, target, token_loss, temperature=1.3, with_entropy=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_token(impl, device):
    hidden, weight, target, token_loss, _ = problem([1], v=33, device=device, kl_coef=0.2, entropy_coef=0.1)
    assert_matches_reference(hidden, weight, target, token_loss)


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
@pytest.mark.parametrize("case", ["clip-and-dual-clip", "kl-k3-entropy", "tis"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_triton_path_matches_the_reference(impl, device, case, agg):
    hidden, weight, target, token_loss, _ = problem(
        [5, 12, 3], d=40, v=70, agg=agg, device=device, **CASES[case]
    )
    assert_matches_reference(hidden, weight, target, token_loss, temperature=0.9)


def test_without_entropy_the_token_loss_gets_none(impl, device):
    hidden, weight, target, token_loss, _ = problem([4, 6], v=40, device=device)
    seen = []

    def spy(lp, ent, rows):
        seen.append(ent)
        return token_loss(lp, ent, rows)

    got = assert_matches_reference(hidden, weight, target, spy, with_entropy=False)
    assert got[2] is None and seen and all(e is None for e in seen)


def test_upstream_gradient_scales_the_stored_gradients(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    hidden, weight, target, token_loss, _ = problem([3, 8])
    _, _, _, gh, gw = run(kernels.linear_logprob_loss, hidden, weight, target, token_loss)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _, _ = kernels.linear_logprob_loss(h, w, target, token_loss)
    (-2.5 * loss).backward()
    torch.testing.assert_close(h.grad, -2.5 * gh)
    torch.testing.assert_close(w.grad, -2.5 * gw)


def test_only_the_inputs_that_need_a_gradient_get_one(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    hidden, weight, target, token_loss, _ = problem([3, 8])
    w = weight.clone().requires_grad_()
    loss, _, _ = kernels.linear_logprob_loss(hidden, w, target, token_loss)
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with torch.no_grad():
        loss_ng, lp, _ = kernels.linear_logprob_loss(hidden, weight.requires_grad_(), target, token_loss)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())


def test_no_tokens(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss, lp, ent = kernels.linear_logprob_loss(
        h, w, torch.zeros(0, dtype=torch.long), lambda *a: 1 / 0, with_entropy=True
    )
    loss.backward()
    assert loss.item() == 0.0 and lp.shape == (0,) and ent.shape == (0,)
    assert (w.grad == 0).all()


def test_bf16_inputs_are_close_to_the_fp32_result(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    hidden, weight, target, token_loss, _ = problem([9, 4], entropy_coef=0.05)
    got = run(
        kernels.linear_logprob_loss,
        hidden,
        weight,
        target,
        token_loss,
        dtype=torch.bfloat16,
        with_entropy=True,
    )
    want = run(linear_logprob_loss_reference, hidden, weight, target, token_loss, dtype=torch.float64,
               with_entropy=True)  # fmt: skip
    assert got[3].dtype == got[4].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().clamp_min(1e-3)
        assert ((a.double() - b).abs().max() / scale) < 3e-2


def test_bad_input_fails_clearly(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    hidden, weight, target, token_loss, _ = problem([3, 2])
    with pytest.raises(TypeError, match="token_loss must return a 0-dim floating tensor"):
        kernels.linear_logprob_loss(hidden, weight, target, lambda lp, ent, rows: lp)
    with pytest.raises(ValueError, match="token_loss returned NaN or Inf"):
        kernels.linear_logprob_loss(hidden, weight, target, lambda lp, ent, rows: (lp * float("nan")).sum())
    with pytest.raises(TypeError, match="token_loss must be callable"):
        kernels.linear_logprob_loss(hidden, weight, target, None)
    with pytest.raises(ValueError, match="target has ids outside the vocabulary"):
        kernels.linear_logprob_loss(hidden, weight, target + 1000, token_loss)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kernels.linear_logprob_loss(hidden, weight, target, token_loss, temperature=0)
    with pytest.raises(ValueError, match="D must match"):
        kernels.linear_logprob_loss(hidden[:, :5], weight, target, token_loss)
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs the entropies"):
        bad = PolicyTokenLoss(torch.ones(5), torch.ones(5), entropy_coef=0.1)
        kernels.linear_logprob_loss(hidden, weight, target, bad)
    with pytest.raises(ValueError, match="old_logprob has 4 entries; expected adv's 5"):
        PolicyTokenLoss(torch.ones(5), torch.ones(5), old_logprob=torch.zeros(4))
    with pytest.raises(ValueError, match="tis_cap=2 must be >= 0 and needs sample_logprob"):
        PolicyTokenLoss(torch.ones(5), torch.ones(5), tis_cap=2)


def test_chunk_rows_follow_the_workspace_budget(monkeypatch):
    monkeypatch.setenv("RESRL_WORKSPACE_MB", "1")
    # Two [C, V] fp32 buffers in 1 MiB: C = 2**20 // (8 V).
    assert fused_loss.chunk_rows(10_000, 1024) == 128
    assert fused_loss.chunk_rows(5, 1024) == 5
    assert fused_loss.chunk_rows(10, 2**20) == 1
    monkeypatch.setenv("RESRL_WORKSPACE_MB", "0")
    with pytest.raises(ValueError, match="RESRL_WORKSPACE_MB='0' must be a positive number of MiB"):
        fused_loss.chunk_rows(10, 10)


# ---- GPU only -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["clip-and-dual-clip", "kl-k3-entropy"])
def test_gpu_bf16_matches_the_float64_reference(case, monkeypatch):
    """bf16 on CUDA (the Triton path): loss, log-probs, entropies and both gradients against the
    float64 reference on the same rounded inputs. N = 2234 tokens (no multiple of the 128-token
    block) in sequences of 700, 1200, 333 and 1; V no power of two."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    d, v = 512, 50257
    hidden, weight, target, token_loss, _ = problem(
        [700, 1200, 333, 1], d=d, v=v, agg="seq-mean-token-mean", device="cuda", w_scale=2 * d**-0.5,
        **CASES[case],
    )  # fmt: skip
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    kw = dict(temperature=0.9, with_entropy=True)
    got = run(kernels.linear_logprob_loss, hidden, weight, target, token_loss, dtype=torch.bfloat16, **kw)
    want = run(linear_logprob_loss_reference, hidden, weight, target, token_loss, dtype=torch.float64, **kw)
    assert got[3].dtype == got[4].dtype == torch.bfloat16 and got[3].device.type == "cuda"
    names = ("loss", "logprob", "entropy", "grad_hidden", "grad_weight")
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < BF16_REL_TOL, f"{name}: rel err {err:.2e}"
