"""`resrl estimate`: the fake-tensor estimate against the measured peak of the same step on the CPU,
and the command's user errors.

The measurement (`resrl.estimate.measure_cpu`) runs the phases on real fp32 tensors and reads the
CPU allocator's running total of live bytes from the profiler's allocation events: it sees every
allocation, inside the kernels' custom ops and inside aten kernels too, which a dispatch-level
tracker cannot (tracemalloc does not see torch's allocator; RSS moves with the allocator's caching
and the interpreter). The shapes make activations, not weights, most of each peak.
"""

import pytest

from resrl.cli import main
from resrl.estimate import PHASES, StepShape, estimate, measure_cpu, model_names

# tests/small.py's model (vocabulary: a size that is not a power of two, as the char tokenizer's).
SMALL = dict(hidden=64, layers=2, heads=2, kv=1, mlp=128, tied=True, vocab=61, head_dim=32)
# A few-layer Qwen3 of hidden 256 with an untied head.
MID = dict(hidden=256, layers=2, heads=4, kv=2, mlp=768, tied=False, vocab=3001, head_dim=64)

CASES = {
    # padded micro-batches of 8, gradient checkpointing, old log-probs in the pre-pass
    "small-padded": (SMALL, StepShape(prompts=4, n=4, mini_batch_prompts=2, prompt_len=24, response_len=104)),
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
    ),
}


@pytest.mark.parametrize("path", ["resrl", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_within_10_percent_of_the_measured_cpu_peak(case, path):
    dims, shape = CASES[case]
    est = estimate(dims, shape, path=path, target="cpu").peaks
    real = measure_cpu(dims, shape, path=path)
    assert set(est) == set(real) == set(PHASES)
    errors = {phase: est[phase] / real[phase] - 1 for phase in PHASES}
    assert all(abs(e) <= 0.10 for e in errors.values()), (errors, est, real)


def test_reference_path_costs_more_than_resrl_with_qwen3s_vocabulary():
    # Fake tensors only, the device's bf16 path: a two-layer model with Qwen3's vocabulary.
    dims = dict(hidden=256, layers=2, heads=4, kv=2, mlp=768, tied=True, vocab=151936, head_dim=64)
    shape = StepShape(
        prompts=2, n=2, mini_batch_prompts=1, prompt_len=64, response_len=960, micro_batch_size=2
    )
    ours = estimate(dims, shape, path="resrl").peaks
    ref = estimate(dims, shape, path="reference").peaks
    # The reference's pre-pass forms [2, 1024, 151936] logits in bf16, then in fp32 (1.2 GiB) and
    # their log-softmax, and keeps every layer's hidden states, where resrl forms none of them.
    assert ref["prepass"] - ours["prepass"] > 2 * 2**30
    assert ref["optimizer"] == ours["optimizer"]


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
    line = _user_error(capsys, ["estimate", "--model", "qwen3-5b"])
    assert "'qwen3-5b'" in line
    assert all(name in line for name in model_names())
    assert model_names() == ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--gpu-mem", "0"], "--gpu-mem"),
        (["--gpu-mem", "10", "--reserve", "12"], "--reserve 12 GiB must be below --gpu-mem 10 GiB"),
        (["--n", "0"], "--n"),
        (["--positives", "5"], "--positives must be in [0, n=4], got 5"),
        (["--prompts", "100"], "--prompts 100 must be a multiple of --mini-batch-prompts 64"),
        (["--micro-batch-tokens", "-1"], "--micro-batch-tokens"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, says):
    assert says in _user_error(capsys, ["estimate", "--model", "qwen3-0.6b", *argv])
