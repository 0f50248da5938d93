"""`resrl estimate`: the fake-tensor estimate against the measured peak of the same step on the CPU,
the weight state it counts in each mode, and the command's output and user errors.

The measurement (`resrl.estimate.measure_cpu`) runs the phases on real tensors in the trainer's
mode for the dtype (fp32: the plain module; bf16: FSDP2 with MixedPrecisionPolicy(bf16, fp32
reduce) and fp32 master weights on a one-process gloo group) and reads the CPU allocator's running
total of live bytes from the profiler's allocation events: it sees every allocation, inside the
kernels' custom ops, aten kernels and FSDP2 too, which a dispatch-level tracker cannot
(tracemalloc does not see torch's allocator; RSS moves with the allocator's caching and the
interpreter). The estimate models FSDP2's buffers; the measurement runs them.
"""

import dataclasses
import json

import pytest

from resrl.cli import main
from resrl.errors import InputError
from resrl.estimate import (
    DTYPES,
    GIB,
    PATHS,
    PHASES,
    Mode,
    StepShape,
    _bench_step,
    estimate,
    measure_cpu,
    model_names,
    state_allocations,
)
from resrl.optim import OPTIMIZERS, state_bytes

# tests/small.py's model (vocabulary: a size that is not a power of two, as the char tokenizer's).
SMALL = dict(hidden=64, layers=2, heads=2, kv=1, mlp=128, tied=True, vocab=61, head_dim=32)
# A few-layer Qwen3 of hidden 256 with an untied head: its 16 B/param of state (50 MB) are about
# half of each peak, so the weight accounting shows.
MID = dict(hidden=256, layers=2, heads=4, kv=2, mlp=768, tied=False, vocab=3001, head_dim=64)
# The same with three blocks and tied embeddings (a root whose one weight gets two gradients).
MID_TIED = dict(MID, layers=3, tied=True)

# Packed micro-batches: exact to 1%. Padded ones: 10%, because the estimate builds the attention
# mask that a batch of equal lengths skips (+3% to +8% on the update and pre-pass of SMALL).
PACKED, PADDED = 0.01, 0.10
# Blocks wider than everything else (vocabulary 61): the update's peak falls inside a block's
# backward, where its bf16 gradients and fp32 reduce-scatter buffer count (without them the
# estimate is 7% low) and, with several processes, the all-gather buffers.
WIDE = dict(hidden=256, layers=3, heads=4, kv=2, mlp=4096, tied=True, vocab=61, head_dim=64)
WIDE_SHAPE = dict(
    prompts=2, n=2, mini_batch_prompts=2, prompt_len=16, response_len=112, micro_batch_tokens=256
)
# An untied head of 8.2 M parameters beside two small blocks and a short micro-batch: the pre-pass
# peaks where the root is unsharded, and one-process FSDP2 casts its parameters one at a time
# (counting the whole root's casts at once made the estimate 5% high).
ROOT = dict(hidden=256, layers=2, heads=4, kv=2, mlp=768, tied=False, vocab=32003, head_dim=64)
CASES = {
    # padded micro-batches of 8, gradient checkpointing, old log-probs in the pre-pass
    "small-padded": (
        SMALL,
        StepShape(prompts=4, n=4, mini_batch_prompts=2, prompt_len=24, response_len=104),
        PADDED,
    ),
    # packed micro-batches of 768 tokens, every block's activations kept
    "mid-packed": (
        MID,
        StepShape(
            prompts=4,
            n=4,
            mini_batch_prompts=2,
            prompt_len=31,
            response_len=161,
            micro_batch_tokens=768,
            gradient_checkpointing=False,
        ),
        PACKED,
    ),
    # packed, checkpointed blocks (recomputed in the backward), one micro-batch per update (the
    # gradients are created by it), the tied root
    "mid-tied-packed-checkpointed": (
        MID_TIED,
        StepShape(
            prompts=2, n=4, mini_batch_prompts=2, prompt_len=31, response_len=161, micro_batch_tokens=2000
        ),
        PACKED,
    ),
    "wide-checkpointed": (WIDE, StepShape(**WIDE_SHAPE), PACKED),
    "wide": (WIDE, StepShape(**WIDE_SHAPE, gradient_checkpointing=False), PACKED),
    "root": (
        ROOT,
        StepShape(
            prompts=2, n=2, mini_batch_prompts=2, prompt_len=16, response_len=48, micro_batch_tokens=256
        ),
        PACKED,
    ),
}
# (case, path, dtype, processes): every case in one process (fp32: the plain module; bf16: FSDP2
# on a one-process gloo group); FSDP2 over 2 and 3 processes as rank 0 of a fake group (3: shards
# padded, 3001 and 256 rows not multiples of 3), fp32 there too (FSDP2 without mixed precision).
MEASURED = [
    *[
        (c, p, d, 1)
        for c in ("small-padded", "mid-packed", "mid-tied-packed-checkpointed")
        for p in PATHS
        for d in DTYPES
    ],
    *[(c, "resrl", "bfloat16", w) for c in ("wide-checkpointed", "wide") for w in (1, 2)],
    ("wide", "resrl", "float32", 3),
    ("mid-packed", "resrl", "bfloat16", 3),
    ("mid-packed", "reference", "float32", 2),
    *[("root", "resrl", "bfloat16", w) for w in (1, 2)],
]


@pytest.mark.parametrize("case, path, dtype, world", MEASURED, ids=["-".join(map(str, m)) for m in MEASURED])
def test_estimate_agrees_with_the_measured_cpu_peak(case, path, dtype, world):
    dims, shape, tolerance = CASES[case]
    est = estimate(dims, shape, path=path, mode=Mode(dtype=dtype, world_size=world, device="cpu"))
    real = measure_cpu(dims, shape, path=path, dtype=dtype, world_size=world)
    assert set(real) == set(PHASES)
    errors = {phase: est.device[phase] / real[phase] - 1 for phase in PHASES}
    assert all(abs(e) <= tolerance for e in errors.values()), (errors, est.device, real)
    assert est.host == dict.fromkeys(PHASES, 0)


# LoRA (resrl.lora.apply on the fake model and on the measured one): a frozen base in the
# compute dtype, fp32 adapters; the same tolerances. "wide" over 2 processes: without weight
# gradients the backward's peak is where FSDP2 prefetches the block before (its all-gather buffer
# beside the running block's copy, no copy-out yet).
LORA_MEASURED = [
    ("mid-packed", "resrl", "float32", 1),
    ("mid-packed", "resrl", "bfloat16", 1),
    ("mid-tied-packed-checkpointed", "resrl", "bfloat16", 1),
    ("wide-checkpointed", "resrl", "bfloat16", 1),
    ("wide", "resrl", "bfloat16", 2),
    ("wide", "resrl", "float32", 3),
    ("mid-packed", "reference", "bfloat16", 1),
    ("small-padded", "resrl", "float32", 1),
    ("root", "resrl", "bfloat16", 1),
]


@pytest.mark.parametrize(
    "case, path, dtype, world", LORA_MEASURED, ids=["-".join(map(str, m)) for m in LORA_MEASURED]
)
def test_lora_estimate_agrees_with_the_measured_cpu_peak(case, path, dtype, world):
    dims, shape, tolerance = CASES[case]
    rank = 16
    est = estimate(
        dims, shape, path=path, mode=Mode(dtype=dtype, world_size=world, device="cpu", lora_rank=rank)
    )
    real = measure_cpu(dims, shape, path=path, dtype=dtype, world_size=world, lora_rank=rank)
    errors = {phase: est.device[phase] / real[phase] - 1 for phase in PHASES}
    assert all(abs(e) <= tolerance for e in errors.values()), (errors, est.device, real)
    # Adapters on q, k, v, o, gate, up, down of every block: r x (in + out) each.
    d, hd, f = dims["hidden"], dims["head_dim"], dims["mlp"]
    q, kv = dims["heads"] * hd, dims["kv"] * hd
    per_block = rank * ((d + q) * 2 + (d + kv) * 2 + 2 * (d + f) + (f + d))
    assert est.params == dims["layers"] * per_block
    assert est.frozen == estimate(dims, shape, mode=Mode(device="cpu")).params


def _mib(n: int) -> float:
    return n / 2**20


@pytest.mark.parametrize(
    "mode",
    [
        Mode(),
        Mode(world_size=4),
        Mode(offload=True),
        Mode(offload=True, world_size=2, kl_reference=True),
        Mode(kl_reference=True),
        Mode(dtype="float32"),
    ],
    ids=["1gpu", "4gpus", "offload", "offload-2gpus-kl", "kl", "fp32-plain"],
)
def test_weight_state_is_16_bytes_per_parameter_where_the_trainer_keeps_it(mode):
    # Fake tensors, the GPU path, a model whose weights dwarf its activations: Qwen3's vocabulary.
    dims = dict(hidden=512, layers=2, heads=4, kv=2, mlp=1536, tied=False, vocab=151936, head_dim=128)
    shape = StepShape(prompts=2, n=2, mini_batch_prompts=2, prompt_len=8, response_len=8, micro_batch_size=2)
    est = estimate(dims, shape, mode=mode)
    p, w = est.params, mode.world_size
    state = 16 * p / w
    # The optimizer step: the state, foreach AdamW's sqrt(v) on the GPU (4 B/param), for-loop
    # AdamW on the host (one parameter's temporaries). The compute copies are freed then.
    reference = 2 * p / w if mode.kl_reference else 0
    root = 2 * (2 * 151936 * 512 + 512)
    if mode.offload:
        # For-loop AdamW's temporaries: sqrt(v) and its quotient, of one parameter at a time
        # (here the embeddings' shard), and scalars (the step count, norms).
        largest = 4 * 151936 * 512 / w
        assert state + reference <= est.host["optimizer"] <= state + reference + 2 * largest + 2**20
        # The device: the reference root's bf16 copy, never freed (no backward reshards it).
        assert est.device["optimizer"] == pytest.approx(root if mode.kl_reference else 0, abs=2**20)
        # Every rank builds the whole fp32 model on the host first.
        assert est.host["load"] >= 4 * p
    else:
        expected = state + 4 * p / w + reference + (root if mode.kl_reference else 0)
        assert _mib(est.device["optimizer"]) == pytest.approx(_mib(expected), rel=0.02)
        assert est.host["optimizer"] == 0
    # The update holds the state, the root's compute copy (bf16: 2 B/param of the embeddings
    # and the head, whole on every rank) and its gradients and fp32 reduce buffer at the end.
    assert est.device["update"] > (0 if mode.offload else state) + (root if mode.sharded else 0)


@pytest.mark.parametrize(
    "mode",
    [
        Mode(lora_rank=8),
        Mode(lora_rank=8, world_size=4),
        Mode(lora_rank=8, offload=True),
        Mode(lora_rank=8, offload=True, world_size=2, kl_reference=True),
        Mode(lora_rank=8, dtype="float32"),
    ],
    ids=["1gpu", "4gpus", "offload", "offload-2gpus-kl", "fp32-plain"],
)
def test_lora_holds_a_frozen_base_in_the_compute_dtype_and_16_bytes_per_adapter_parameter(mode):
    # As above: fake tensors, the GPU path, Qwen3's vocabulary.
    dims = dict(hidden=512, layers=2, heads=4, kv=2, mlp=1536, tied=False, vocab=151936, head_dim=128)
    shape = StepShape(prompts=2, n=2, mini_batch_prompts=2, prompt_len=8, response_len=8, micro_batch_size=2)
    est = estimate(dims, shape, mode=mode)
    full = estimate(dims, shape, mode=dataclasses.replace(mode, lora_rank=0))
    a, base, w = est.params, est.frozen, mode.world_size
    assert base == full.params and a == 2 * 8 * (2 * (512 + 512) + 2 * (512 + 256) + 3 * (512 + 1536))
    size = mode.compute_dtype.itemsize
    # The optimizer step: the adapters' 16 B/param and foreach AdamW's sqrt(v) (GPU), or for-loop
    # AdamW's temporaries of one adapter (host); the base in the compute dtype beside them.
    state, frozen = 16 * a / w, size * base / w
    reference = 2 * base / w if mode.kl_reference else 0
    if mode.offload:
        assert state + frozen + reference <= est.host["optimizer"] <= state + frozen + reference + 2**20
        root = 2 * (2 * 151936 * 512 + 512)
        assert est.device["optimizer"] == pytest.approx(root if mode.kl_reference else 0, abs=2**20)
        # The host builds the whole base in the compute dtype (bf16), not fp32, then shards it
        # unit after unit (a unit's shards beside the whole model).
        assert 2 * base <= est.host["load"] <= 2 * base * (1 + 1 / w) + 16 * a
        assert est.host["optimizer"] < full.host["optimizer"] / 4
    else:
        expected = state + 4 * a / w + frozen
        assert _mib(est.device["optimizer"]) == pytest.approx(_mib(expected), rel=0.02)
        assert est.host["optimizer"] == 0
        # Each rank moves the whole base to its GPU before sharding: 2 B/param (bf16), 4 (fp32).
        assert size * base <= est.device["load"] <= size * base * (1 + 1 / w) + 16 * a
        assert est.device["update"] < full.device["update"]


def test_reference_path_costs_more_than_resrl_with_qwen3s_vocabulary():
    # Fake tensors only, the device's bf16 path: a two-layer model with Qwen3's vocabulary.
    dims = dict(hidden=256, layers=2, heads=4, kv=2, mlp=768, tied=True, vocab=151936, head_dim=64)
    shape = StepShape(
        prompts=2, n=2, mini_batch_prompts=1, prompt_len=64, response_len=960, micro_batch_size=2
    )
    ours = estimate(dims, shape, path="resrl").device
    ref = estimate(dims, shape, path="reference").device
    # The reference's pre-pass forms [2, 1024, 151936] logits in bf16, then in fp32 (1.2 GiB) and
    # their log-softmax, and keeps every layer's hidden states, where resrl forms none of them.
    assert ref["prepass"] - ours["prepass"] > 2 * GIB
    assert ref["optimizer"] == ours["optimizer"]
    assert ref["load"] == ours["load"]


@pytest.fixture
def two_models(monkeypatch):
    """Two small shapes under qwen3 names, so the command runs in seconds."""
    models = _bench_step().MODELS
    monkeypatch.setitem(models, "qwen3-test-small", SMALL)
    monkeypatch.setitem(models, "qwen3-test-mid", MID)
    return ["qwen3-test-small", "qwen3-test-mid"]


BATCH = [
    "--prompts",
    "2",
    "--n",
    "2",
    "--mini-batch-prompts",
    "2",
    "--prompt-len",
    "16",
    "--response-len",
    "48",
]


def test_table_names_the_capacity_and_what_is_usable(capsys, two_models):
    assert main(["estimate", "--model", two_models[1], *BATCH, "--gpu-mem", "24", "80"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2, fp32 master weights, gradients and AdamW state on the GPU (16 B/param)" in out
    header = next(line for line in out.splitlines() if line.startswith("path"))
    assert "fits 24 GiB (22 usable)" in header and "fits 80 GiB (78 usable)" in header
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["resrl"], ["reference"])]
    assert [r[0] for r in rows] == ["resrl", "reference"]
    assert all(r[-2:] == ["yes", "yes"] for r in rows)


def test_json_is_one_object_per_command(capsys, two_models):
    args = ["--paths", "resrl", "--world-size", "2", "--offload", "--json", *BATCH]
    assert main(["estimate", "--model", two_models[0], *args]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["model"] == two_models[0] and one["path"] == "resrl" and list(one["paths"]) == ["resrl"]
    # Embeddings (tied), per block q, o, k, v, q/k norms, two norms, MLP; final norm.
    assert one["params"] == 61 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 32 + 2 * 64 + 3 * 64 * 128) + 64
    assert one["frozen_params"] == 0
    assert one["mode"] == {
        "dtype": "bfloat16",
        "world_size": 2,
        "offload": True,
        "kl_reference": False,
        "lora_rank": 0,
        "sharding": "fsdp2",
        "state_bytes_per_param": 16,
    }
    assert one["device_peak_bytes"] == max(v["device_bytes"] for v in one["phases"].values())
    assert one["host_peak_bytes"] == max(v["host_bytes"] for v in one["phases"].values())
    assert one["host_peak_bytes"] >= 16 * one["params"] / 2
    assert set(one["phases"]) == set(PHASES) and one["fits"] == {"80": True}

    assert main(["estimate", "--model", *two_models, *args]) == 0
    several = json.loads(capsys.readouterr().out)
    assert list(several) == ["models"]
    assert [m["model"] for m in several["models"]] == two_models
    assert several["models"][0] == one


def test_lora_rank_in_the_table_and_the_json(capsys, two_models):
    assert main(["estimate", "--model", two_models[0], "--lora-rank", "8", "--paths", "resrl", *BATCH]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 8, bf16 compute on 1 GPU: FSDP2, frozen bf16 base (2 B/param)" in out
    assert "M trained parameters (the adapters) on a 0.00 B frozen base; GiB per rank" in out
    assert main(["estimate", "--model", two_models[0], "--lora-rank", "8", "--json", *BATCH]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--model", two_models[0], "--json", *BATCH]) == 0
    full = json.loads(capsys.readouterr().out)
    # Per block, r x (in + out) for q (64 -> 64), k and v (64 -> 32), o, gate and up (64 -> 128), down.
    assert lora["params"] == 2 * 8 * (2 * 128 + 2 * 96 + 3 * 192)
    assert lora["frozen_params"] == full["params"] and full["frozen_params"] == 0
    assert lora["mode"]["lora_rank"] == 8 and full["mode"]["lora_rank"] == 0
    assert list(lora["paths"]) == ["resrl", "reference"]
    assert (
        lora["paths"]["resrl"]["phases"]["optimizer"]["device_bytes"]
        < full["phases"]["optimizer"]["device_bytes"]
    )


def _user_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resrl: error: "), err
    return err[0]


def test_unknown_model_lists_the_accepted_ones(capsys):
    line = _user_error(capsys, ["estimate", "--model", "qwen3-0.6b", "qwen3-5b"])
    assert "'qwen3-5b'" in line
    assert all(name in line for name in model_names())
    assert model_names() == ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--gpu-mem", "0"], "--gpu-mem"),
        (["--gpu-mem", "10", "80", "--reserve", "12"], "--reserve 12 GiB must be below --gpu-mem 10 GiB"),
        (["--n", "0"], "--n"),
        (["--positives", "5"], "--positives must be in [0, n=4], got 5"),
        (["--prompts", "100"], "--prompts 100 must be a multiple of --mini-batch-prompts 64"),
        (["--micro-batch-tokens", "-1"], "--micro-batch-tokens"),
        (["--paths", "resrl,full"], "--paths 'resrl,full': a comma-separated list of resrl, reference"),
        (["--world-size", "0"], "--world-size"),
        (["--world-size", "3"], "--mini-batch-prompts 64 must be a multiple of --world-size 3"),
        (["--dtype", "float16"], "--dtype"),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--optim", "adamw4bit"], "adamw4bit"),
        (["--optim", "sgd"], "--optim"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, says):
    assert says in _user_error(capsys, ["estimate", "--model", "qwen3-0.6b", *argv])


# --------------------------------------------------------------------------- optim.name


# As the weight-state tests: fake tensors, the GPU path, Qwen3's vocabulary (an untied head: the
# embeddings and the head are the largest tensors, 77.8 M values each).
QWEN_VOCAB_DIMS = dict(hidden=512, layers=2, heads=4, kv=2, mlp=1536, tied=False, vocab=151936, head_dim=128)
TINY_BATCH = StepShape(prompts=2, n=2, mini_batch_prompts=2, prompt_len=8, response_len=8, micro_batch_size=2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_allocations_add_up_to_what_resrl_optim_counts(name):
    # Under the quantization threshold, at it, not a multiple of 128 or 256, large.
    for n in (1, 4095, 4096, 4160, 8320, 256 * 512, 151936 * 512 // 3):
        assert sum(state_allocations(name, n)) == state_bytes(name, n), n


def test_default_optimizer_is_adamw_and_its_estimate_is_unchanged():
    assert Mode().optim == "adamw" and Mode().state_bytes_per_param == 16
    est = estimate(QWEN_VOCAB_DIMS, TINY_BATCH)
    named = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=Mode(optim="adamw"))
    assert (est.device, est.host) == (named.device, named.host)
    # Two fp32 moments and a 0-d step per tensor (q, k, v, o, their two norms, gate, up, down,
    # two norms: 11 per block; the embeddings, the final norm, the head).
    assert est.optimizer_state == 8 * est.params + 4 * (11 * 2 + 3)


@pytest.mark.parametrize(
    "mode",
    [
        Mode(),
        Mode(world_size=4),
        Mode(offload=True),
        Mode(offload=True, world_size=2, kl_reference=True),
        Mode(dtype="float32"),
    ],
    ids=["1gpu", "4gpus", "offload", "offload-2gpus-kl", "fp32-plain"],
)
def test_adamw8bit_holds_a_quarter_of_adamws_state_and_lowers_the_peak_by_the_difference(mode):
    full = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=mode)
    low = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=dataclasses.replace(mode, optim="adamw8bit"))
    p, w = full.params, mode.world_size
    assert low.params == p
    # 2 + 8/256 bytes per value against 8: the state is about 2.03/8 of adamw's.
    assert low.optimizer_state / full.optimizer_state == pytest.approx(2.03125 / 8, rel=0.01)
    saved = full.optimizer_state - low.optimizer_state
    assert saved == pytest.approx((8 - 2.03125) * p / w, rel=0.01)
    where = "host" if mode.offload else "device"
    # The update lives with the state: it holds exactly the difference less.
    assert full.__dict__[where]["update"] - low.__dict__[where]["update"] == pytest.approx(saved, abs=2**20)
    # The optimizer step: weights and gradients (8 B/param), the 8-bit state, and torchao's
    # temporaries of its largest tensor (assumed two fp32 buffers: 8 B/value of the embeddings).
    largest = 151936 * 512 / w
    reference = 2 * p / w if mode.kl_reference else 0
    expected = 8 * p / w + low.optimizer_state + 8 * largest + reference
    assert _mib(low.__dict__[where]["optimizer"]) == pytest.approx(_mib(expected), rel=0.02)
    if not mode.offload:
        # The device peak drops by the state saved, and at most by the foreach AdamW's sqrt(v)
        # more (4 B/param) where adamw's peak is its step.
        drop = full.device_peak - low.device_peak
        assert saved - 2**20 <= drop <= saved + 4 * p / w + 2**20
    else:
        assert low.device == full.device
        assert full.host_peak - low.host_peak == pytest.approx(saved, abs=2**20)


def test_the_other_low_bit_optimizers_in_fp32_on_one_process():
    mode = Mode(dtype="float32")
    full = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=mode)
    p = full.params
    four = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=dataclasses.replace(mode, optim="adamw4bit"))
    bnb = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=dataclasses.replace(mode, optim="adamw8bit-bnb"))
    assert four.optimizer_state / full.optimizer_state == pytest.approx(1.0625 / 8, rel=0.01)
    assert bnb.optimizer_state / full.optimizer_state == pytest.approx(2.03125 / 8, rel=0.01)
    # bitsandbytes steps in place (no temporaries of a tensor's size); torchao as above.
    assert _mib(bnb.device["optimizer"]) == pytest.approx(_mib(8 * p + bnb.optimizer_state), rel=0.01)
    expected = 8 * p + four.optimizer_state + 8 * 151936 * 512
    assert _mib(four.device["optimizer"]) == pytest.approx(_mib(expected), rel=0.01)
    assert four.device_peak < bnb.device_peak < full.device_peak


@pytest.mark.parametrize("mode", [Mode(lora_rank=8), Mode(lora_rank=8, world_size=2)], ids=["1gpu", "2gpus"])
def test_lora_counts_the_low_bit_state_of_the_adapters_only(mode):
    adamw = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=mode)
    low = estimate(QWEN_VOCAB_DIMS, TINY_BATCH, mode=dataclasses.replace(mode, optim="adamw8bit"))
    w, r = mode.world_size, 8
    # A [r, in] and B [out, r] of q, k, v, o, gate, up, down; shards: dim 0 over the processes.
    d, q, kv, f = 512, 4 * 128, 2 * 128, 1536
    shapes = [(r, d), (q, r), (r, d), (kv, r), (r, d), (kv, r), (r, q), (d, r),
              (r, d), (f, r), (r, d), (f, r), (r, f), (d, r)] * 2  # fmt: skip
    local = [-(-a // w) * b for a, b in shapes]
    assert low.params == adamw.params == sum(a * b for a, b in shapes)
    assert low.optimizer_state == sum(state_bytes("adamw8bit", n) for n in local)
    assert adamw.optimizer_state == sum(state_bytes("adamw", n) for n in local)
    # Adapter tensors of 4096 values carry torchao's two 1 KiB code tables: more than 2.03 B/value;
    # over 2 processes the A shards ([4, 512]) fall under 4096 values and keep fp32 moments.
    assert low.optimizer_state < adamw.optimizer_state / (2 if w == 1 else 1.4)
    saved = adamw.optimizer_state - low.optimizer_state
    assert adamw.device["update"] - low.device["update"] == pytest.approx(saved, abs=2**16)


@pytest.mark.parametrize("name", ["adamw4bit", "adamw8bit-bnb"])
def test_optimizers_that_step_no_sharded_parameters_are_refused_where_the_trainer_shards(name):
    for mode in (dict(), dict(dtype="float32", world_size=2), dict(dtype="float32", offload=True)):
        with pytest.raises(InputError, match="cannot step FSDP2-sharded parameters"):
            Mode(optim=name, **mode)
    Mode(optim=name, dtype="float32")
    with pytest.raises(InputError, match="optim.name 'sgd' is unknown"):
        Mode(optim="sgd")


def _estimate_cli(capsys, argv: list[str], optim: str | None) -> str:
    """`resrl estimate` with optim.name (the `--optim` flag's value, as the CLI hands it over)."""
    from resrl.cli import build_parser
    from resrl.estimate import main as estimate_main

    args = build_parser().parse_args(["estimate", *argv])
    if optim is not None:
        args.optim = optim
    assert estimate_main(args) == 0
    return capsys.readouterr().out


def test_json_and_table_name_the_optimizer_and_its_state(capsys, two_models):
    argv = ["--model", two_models[1], "--paths", "resrl", *BATCH]
    default = json.loads(_estimate_cli(capsys, [*argv, "--json"], None))
    adamw = json.loads(_estimate_cli(capsys, [*argv, "--json"], "adamw"))
    low = json.loads(_estimate_cli(capsys, [*argv, "--json"], "adamw8bit"))
    assert default == adamw
    assert adamw["mode"]["state_bytes_per_param"] == 16
    assert adamw["optimizer"] == {
        "name": "adamw",
        "class": "torch AdamW",
        "state_bytes": adamw["optimizer"]["state_bytes"],
        "state_bytes_per_param": 8,
        "where": "device",
    }
    assert adamw["optimizer"]["state_bytes"] == pytest.approx(8 * adamw["params"], rel=0.001)
    assert low["mode"]["state_bytes_per_param"] == 10.03125
    assert low["optimizer"]["name"] == "adamw8bit" and low["optimizer"]["state_bytes_per_param"] == 2.03125
    assert low["optimizer"]["state_bytes"] / adamw["optimizer"]["state_bytes"] == pytest.approx(
        2.03 / 8, rel=0.01
    )
    assert low["device_peak_bytes"] < adamw["device_peak_bytes"]
    out = _estimate_cli(capsys, argv, "adamw8bit")
    assert (
        "FSDP2, fp32 master weights, gradients and AdamW8bit (torchao) state on the GPU (10.03 B/param)"
        in out
    )
    assert "optimizer adamw8bit (torchao AdamW8bit): 0.0" in out
