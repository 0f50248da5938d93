"""build_qwen3, HiddenCapture and forward_logprobs against the model's own logits path (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from resrl.model import HiddenCapture, build_qwen3, forward_logprobs, position_ids_from_mask

VOCAB = 37  # not a power of two
# fp32 on CPU: the fused path and the logits path differ only in summation order.
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")


def tiny(num_layers: int = 2, tie: bool = True, seed: int = 0):
    return build_qwen3(
        VOCAB, hidden_size=64, num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=tie, seed=seed,
    ).eval()  # fmt: skip


def batch(left_pad: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    if left_pad:
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids[mask == 0] = 0
    return ids, mask


def oracle(model, ids, mask, temperature=1.0, **kw):
    """log_softmax of the model's own logits (the path the trainer must never take)."""
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False, **kw
    )
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent, out


def test_build_is_deterministic_by_seed_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    assert a.config.head_dim == 32 and a.config.num_hidden_layers == 2 and a.config.vocab_size == VOCAB
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert tiny(tie=False).lm_head.weight is not tiny(tie=False).model.embed_tokens.weight


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_dim": 16}, "head_dim"),
        ({"num_heads": 3, "num_kv_heads": 2}, "num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
    ids=["head-dim-16", "kv-heads", "hidden-0"],
)
def test_build_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_qwen3(VOCAB, **kwargs)


@pytest.mark.parametrize("left_pad", [False, True], ids=["no-pad", "left-pad"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_logprobs_matches_logits_path(left_pad, temperature):
    model = tiny()
    ids, mask = batch(left_pad)
    with torch.no_grad():
        got = forward_logprobs(model, ids, mask, temperature=temperature, return_entropy=True)
        want_lp, want_ent, _ = oracle(model, ids, mask, temperature)
    assert got["logprob"].shape == (3, 8) and got["logprob"].dtype == torch.float32
    assert got["sub_hidden"] is None
    torch.testing.assert_close(got["logprob"], want_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(got["entropy"], want_ent, atol=ATOL, rtol=0)
    assert forward_logprobs(model, ids, mask)["entropy"] is None


def test_position_ids_count_from_first_real_token():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    want = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]])
    assert torch.equal(position_ids_from_mask(mask), want)


def test_left_padding_does_not_change_real_positions():
    model = tiny()
    ids, mask = batch(left_pad=True)
    with torch.no_grad():
        padded = forward_logprobs(model, ids, mask)["logprob"]
        alone = forward_logprobs(model, ids[2:, 5:], mask[2:, 5:])["logprob"]
    # Row 2 has 5 pad tokens: its real tokens 5..8 are scored at positions 5..7.
    torch.testing.assert_close(padded[2, 5:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gradient_matches_logits_path(tie):
    ids, mask = batch(left_pad=True)
    g = torch.Generator().manual_seed(1)
    coef_lp, coef_ent = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    grads = []
    for path in ("fused", "logits"):
        model = tiny(tie=tie)
        if path == "fused":
            out = forward_logprobs(model, ids, mask, temperature=0.8, return_entropy=True)
            lp, ent = out["logprob"], out["entropy"]
        else:
            lp, ent, _ = oracle(model, ids, mask, 0.8)
        ((lp * coef_lp).sum() + (ent * coef_ent).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    fused, logits = grads
    assert fused.keys() == logits.keys() and "model.embed_tokens.weight" in fused
    assert ("lm_head.weight" in fused) == (not tie)
    for name in logits:
        torch.testing.assert_close(fused[name], logits[name], atol=1e-5, rtol=1e-4, msg=name)


def test_hidden_capture_is_the_penultimate_layer_output():
    model = tiny(num_layers=3)
    ids, mask = batch(left_pad=True)
    with torch.no_grad():
        _, _, ref = oracle(model, ids, mask, output_hidden_states=True)
        with HiddenCapture(model) as cap:
            model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    assert len(ref.hidden_states) == 4
    torch.testing.assert_close(cap.hidden, ref.hidden_states[-2], atol=0, rtol=0)
    assert len(model.model.layers[-1]._forward_pre_hooks) == 0


def test_hidden_capture_accepts_keyword_hidden_states():
    model = tiny()
    layer = model.model.layers[-1]
    x = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    rope = model.model.rotary_emb(x, pos)
    with HiddenCapture(model) as cap:
        layer(hidden_states=x, attention_mask=None, position_ids=pos, position_embeddings=rope)
    assert torch.equal(cap.hidden, x)


def test_forward_logprobs_sub_hidden_layers():
    model = tiny(num_layers=3)
    ids, mask = batch(left_pad=True)
    with torch.no_grad():
        _, _, ref = oracle(model, ids, mask, output_hidden_states=True)
    pen = forward_logprobs(model, ids, mask, subspace_layer="penultimate")
    fin = forward_logprobs(model, ids, mask, subspace_layer="final")
    assert pen["sub_hidden"].shape == (3, 8, 64) and not pen["sub_hidden"].requires_grad
    assert not fin["sub_hidden"].requires_grad and pen["logprob"].requires_grad
    torch.testing.assert_close(pen["sub_hidden"], ref.hidden_states[-2][:, :-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(fin["sub_hidden"], ref.hidden_states[-1][:, :-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        fin["sub_hidden"],
        model.model(ids, mask, position_ids_from_mask(mask)).last_hidden_state[:, :-1].detach(),
        atol=1e-6,
        rtol=0,
    )


def test_capture_under_gradient_checkpointing():
    model = tiny(num_layers=3)
    ids, mask = batch(left_pad=False)
    with torch.no_grad():
        want = forward_logprobs(model, ids, mask, subspace_layer="penultimate")
    model.gradient_checkpointing_enable()
    model.train()
    assert model.model.layers[-1].gradient_checkpointing
    got = forward_logprobs(model, ids, mask, subspace_layer="penultimate")
    got["logprob"].sum().backward()
    torch.testing.assert_close(got["sub_hidden"], want["sub_hidden"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["logprob"].detach(), want["logprob"], atol=1e-6, rtol=0)


def test_forward_logprobs_rejects_bad_input():
    model = tiny()
    ids, mask = batch(left_pad=False)
    with pytest.raises(ValueError, match="subspace_layer"):
        forward_logprobs(model, ids, mask, subspace_layer="middle")
    with pytest.raises(ValueError, match="L >= 2"):
        forward_logprobs(model, ids[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="attention_mask"):
        forward_logprobs(model, ids, mask[:, :-1])
    with pytest.raises(TypeError, match="not a supported causal LM"):
        forward_logprobs(torch.nn.Linear(2, 2), ids, mask)
