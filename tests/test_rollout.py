"""The `hf` rollout engine on a tiny Qwen3 (fp32, CPU): structure, log-probs vs the trainer, seeding.

The oracle for sampling log-probs is the trainer's own `forward_logprobs` on prompt + response;
top-p and greedy are checked against the model's full logits recomputed per sequence.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from resrl.data import Example, encode_prompt
from resrl.model import build_qwen3, forward_logprobs
from resrl.rollout import Sample, SamplingParams
from resrl.rollout.hf import HFEngine
from resrl.tasks import build_char_tokenizer, format_prompt, generate_problems

# fp32 on CPU: the engine's logits and the trainer's fused path differ only in summation order.
ATOL = 1e-4
MAX_POS = 256


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, seed: int = 0):
    return build_qwen3(
        vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, max_position_embeddings=MAX_POS, seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of different lengths (so chunks are left-padded), plus a 1-token prompt."""
    problems = generate_problems(4, seed=0)
    encoded = [
        encode_prompt(Example(prompt=format_prompt(p["problem"]), answer=p["answer"]), tok) for p in problems
    ]
    encoded.append([tok.bos_token_id])
    assert len({len(p) for p in encoded}) >= 3
    return encoded


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s)
        mask[b, width - len(s) :] = 1
    return ids, mask


def flat(result: list[list[Sample]]) -> list[Sample]:
    return [s for group in result for s in group]


def full_logits(model, sample: Sample) -> torch.Tensor:
    """[R, V] fp32 logits predicting each response token, from one unpadded forward."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    p = len(sample.prompt_ids)
    return logits[p - 1 : p - 1 + len(sample.response_ids)]


def test_structure_eos_and_truncation(tok, model, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=30, seed=3)
    result = HFEngine(model, tok, max_batch_size=4).generate(prompts, params)
    assert len(result) == len(prompts)
    eos = tok.eos_token_id
    for prompt, group in zip(prompts, result, strict=True):
        assert len(group) == params.n
        for s in group:
            assert s.prompt_ids == prompt
            assert 1 <= len(s.response_ids) == len(s.logprobs) <= params.max_new_tokens
            assert all(isinstance(x, float) and x <= 0.0 for x in s.logprobs)
            assert s.response_ids.count(eos) == (0 if s.truncated else 1)
            if s.truncated:
                assert len(s.response_ids) == params.max_new_tokens
                assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
            else:
                assert s.response_ids[-1] == eos
                assert s.text == tok.decode(s.response_ids[:-1], skip_special_tokens=True)
    kinds = {s.truncated for s in flat(result)}
    assert kinds == {True, False}, "the seed should give both EOS-ended and truncated samples"


def test_empty_prompt_list_gives_empty_result(tok, model):
    assert HFEngine(model, tok).generate([], SamplingParams()) == []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_trainer_forward(tok, model, prompts, temperature):
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=24, seed=7)
    samples = flat(HFEngine(model, tok).generate(prompts, params))
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        logprob = forward_logprobs(model, ids, mask, temperature=temperature)["logprob"]
    width = ids.shape[1]
    for b, s in enumerate(samples):
        start = width - len(seqs[b]) + len(s.prompt_ids)
        expected = logprob[b, start - 1 : start - 1 + len(s.response_ids)]
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=ATOL, rtol=0)


def test_left_padded_batch_equals_unpadded_single_prompts(tok, model, prompts):
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    batched = flat(HFEngine(model, tok, max_batch_size=64).generate(prompts, params))
    single = flat(HFEngine(model, tok, max_batch_size=1).generate(prompts, params))
    for a, b in zip(batched, single, strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_same_seed_same_samples_and_global_rng_untouched(tok, model, prompts):
    engine = HFEngine(model, tok, max_batch_size=4)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=11)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = flat(engine.generate(prompts, params))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    second = flat(engine.generate(prompts, params))
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    assert [s.logprobs for s in first] == [s.logprobs for s in second]
    other = flat(engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=12)))
    assert [s.response_ids for s in first] != [s.response_ids for s in other]


def test_samples_of_one_prompt_differ(tok, model, prompts):
    group = HFEngine(model, tok).generate(prompts[:1], SamplingParams(n=4, max_new_tokens=12, seed=0))[0]
    assert len({tuple(s.response_ids) for s in group}) == 4


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_samples_in_nucleus_with_renormalized_logprobs(tok, model, prompts, top_p):
    temperature = 0.7
    params = SamplingParams(n=2, temperature=temperature, top_p=top_p, max_new_tokens=16, seed=5)
    samples = flat(HFEngine(model, tok).generate(prompts, params))
    renormalized = 0
    for s in samples:
        probs_RV = torch.softmax(full_logits(model, s) / temperature, dim=-1)
        for t, token in enumerate(s.response_ids):
            p_sorted, order = probs_RV[t].sort(descending=True)
            # The nucleus: the most likely tokens until their mass reaches top_p, the crossing one included.
            before = p_sorted.cumsum(0) - p_sorted
            nucleus = order[before < top_p]
            assert token in nucleus.tolist(), f"token {token} at step {t} outside the top-{top_p} nucleus"
            p_nucleus = probs_RV[t, nucleus]
            expected = torch.log(probs_RV[t, token] / p_nucleus.sum())
            assert abs(s.logprobs[t] - expected.item()) < ATOL
            assert abs(torch.exp(torch.log(p_nucleus / p_nucleus.sum())).sum().item() - 1.0) < 1e-6
            renormalized += len(nucleus) < probs_RV.shape[-1]
    assert renormalized > 0, "top-p never truncated the distribution: the test would not see a bug"


def test_greedy_is_argmax_and_ignores_seed(tok, model, prompts):
    engine = HFEngine(model, tok, max_batch_size=3)
    a = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=16, seed=0))
    b = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=16, seed=99))
    assert [[s.response_ids for s in g] for g in a] == [[s.response_ids for s in g] for g in b]
    for group in a:
        assert group[0].response_ids == group[1].response_ids
        for s in group:
            logits_RV = full_logits(model, s)
            assert s.response_ids == logits_RV.argmax(-1).tolist()
            expected = torch.log_softmax(logits_RV, -1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=ATOL, rtol=0)


def test_checkpoint_generation_config_does_not_leak(tok, prompts, monkeypatch, capfd):
    """A checkpoint's sampling defaults (and transformers' top_k=50) must not reach generate."""
    model = tiny(tok)
    checkpoint_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.5
    )
    model.generation_config = checkpoint_config
    built: list[list[str]] = []
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        processors = original(*args, **kwargs)
        built.append([type(p).__name__ for p in processors])
        return processors

    monkeypatch.setattr(model, "_get_logits_processor", spy)
    engine = HFEngine(model, tok)
    for params in (
        SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=6),
        SamplingParams(temperature=0.0, max_new_tokens=6),
    ):
        engine.generate(prompts, params)
    assert built == [["_SampledLogprobs"], ["_SampledLogprobs"]]
    assert model.generation_config is checkpoint_config
    assert "[transformers]" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([[1, 5], []], r"prompt 1 must be a non-empty"),
        ([[1, 5, 999]], r"prompt 0 .*outside the vocabulary or not ints; accepted: ints in \[0, 55\)"),
        ([[1, 5], [-1]], r"prompt 1 .*\[0, 55\)"),
        ([[1, 2.0]], r"prompt 0 .*\[0, 55\)"),
        ([[1] * (MAX_POS - 10)], r"prompt 0 .*beyond the model's max_position_embeddings=256"),
    ],
    ids=["empty-prompt", "id-too-large", "negative-id", "float-id", "too-long"],
)
def test_bad_prompts_raise(tok, model, bad, match):
    with pytest.raises(ValueError, match=match):
        HFEngine(model, tok).generate(bad, SamplingParams(max_new_tokens=11))


def test_bad_engine_arguments_raise(tok, model):
    with pytest.raises(ValueError, match="max_batch_size"):
        HFEngine(model, tok, max_batch_size=0)
    with pytest.raises(TypeError, match="SamplingParams"):
        HFEngine(model, tok).generate([[1]], {"n": 1})


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mode_restored(tok, model, prompts, training, monkeypatch):
    model.train(training)
    model.model.layers[0].train(not training)
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(model.training or any(m.training for m in model.modules()))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    HFEngine(model, tok).generate(prompts[:2], SamplingParams(max_new_tokens=4))
    assert seen == [False]
    assert {name: m.training for name, m in model.named_modules()} == modes

    def boom(*args, **kwargs):
        raise RuntimeError("generate failed")

    monkeypatch.setattr(model, "generate", boom)
    with pytest.raises(RuntimeError, match="generate failed"):
        HFEngine(model, tok).generate(prompts[:2], SamplingParams(max_new_tokens=4))
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()


def test_sync_weights_and_close(tok, model, prompts):
    engine = HFEngine(model, tok)
    engine.sync_weights(model)
    assert engine.model is model
    other = tiny(tok, seed=1)
    engine.sync_weights(other)
    assert engine.model is other
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    s = engine.generate(prompts[:1], greedy)[0][0]
    assert s.response_ids == full_logits(other, s).argmax(-1).tolist()
    engine.close()
    assert engine.model is None
    with pytest.raises(RuntimeError, match="after close"):
        engine.generate(prompts[:1], greedy)


def test_deferred_stop_check_path_keeps_logprobs_aligned(tok, model, monkeypatch):
    """transformers (on MPS) runs one step past the end and undoes it; the recorded steps must not shift.

    CPU has no events, so a no-op event stands in for it; the spy proves a step was undone.
    """
    import transformers.generation.utils as gen_utils

    prompts = [[1, 5, 6, 7], [1, 8]]
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=200, seed=2)
    engine = HFEngine(model, tok)
    plain = engine.generate(prompts, params)

    class NoOpEvent:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

    undone: list[int] = []
    finish = gen_utils.DeferredStopCheck.finish

    def spy_finish(self):
        undone.append(finish(self))
        return undone[-1]

    monkeypatch.setattr(torch, "Event", NoOpEvent)
    monkeypatch.setattr(gen_utils.DeferredStopCheck, "is_supported", staticmethod(lambda *a, **k: True))
    monkeypatch.setattr(gen_utils.DeferredStopCheck, "finish", spy_finish)
    deferred = engine.generate(prompts, params)
    assert undone == [1], "all rows should end with EOS, so the extra step is undone"
    assert all(not s.truncated for s in flat(deferred))
    for a, b in zip(flat(plain), flat(deferred), strict=True):
        assert a.response_ids == b.response_ids
        assert a.logprobs == b.logprobs


def _stop_candidate(tok, sample):
    """A position k >= 1 of a response whose token appears there first and is not EOS, or None."""
    r = sample.response_ids
    for k in range(1, len(r) - 1):
        if r[k] not in r[:k] and r[k] != tok.eos_token_id:
            return k
    return None


def test_extra_stop_ids_end_responses_like_eos(tok, model, prompts):
    """A checkpoint's extra end-of-sequence id (Qwen3 lists two) ends a response, is kept in it
    like EOS, and the response is not truncated; the log-probs before it are unchanged."""
    from resrl.rollout import checkpoint_stop_ids

    # One seeded sample (the same random stream draws the same tokens up to the stop), from the
    # first seed whose response is long enough to stop early in.
    for seed in range(50):
        params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=seed)
        (plain,) = HFEngine(model, tok).generate(prompts[:1], params)[0]
        k = _stop_candidate(tok, plain)
        if k is not None:
            break
    assert k is not None
    stop = plain.response_ids[k]
    (s,) = HFEngine(model, tok, stop_ids=[stop]).generate(prompts[:1], params)[0][:1]
    assert s.response_ids == plain.response_ids[: k + 1] and not s.truncated
    torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(plain.logprobs[: k + 1]))
    assert s.text == tok.decode(plain.response_ids[:k], skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"stop id 999 is not a token id; accepted: ints in \[0, 55\)"):
        HFEngine(model, tok, stop_ids=[999])
    other = tiny(tok)
    other.generation_config = GenerationConfig(eos_token_id=[stop, 10**6])
    assert checkpoint_stop_ids(other) == [stop]
    assert checkpoint_stop_ids(tiny(tok)) == []
