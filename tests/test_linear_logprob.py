"""linear_logprob against the float64 full-logits reference: outputs and both gradients.

Each case runs on the `device` of its `impl` (tests/conftest.py): the Triton path on CUDA tensors
when a GPU is present, under the interpreter on CPU tensors otherwise; the PyTorch path on the CPU.
The reference runs in float64 on the same device."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.chunked
from kernels import linear_logprob
from kernels.reference import linear_logprob_reference

IMPLS = ["torch", "triton"]
# Relative (to the max magnitude) error allowed against float64 on the same rounded inputs, on
# every device: bf16 products are exact in fp32 and are summed in fp32 both in the interpreter
# (upcast, IEEE dot) and on CUDA tensor cores; what bf16 adds is the rounding of the logit
# gradient dz and of the returned gradients. fp32 dots are IEEE on CUDA too (no TF32).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

# name: (N, D, V)
SHAPES = {
    "one_token": (1, 32, 50),
    "not_block_multiples": (37, 40, 131),
    "qwen_vocab_scaled": (23, 32, 1187),  # 151936 = 128 * 1187
    "wide_hidden": (9, 136, 70),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def make_inputs(n, d, v, dtype, seed=0, device="cpu"):
    """Drawn on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * d**-0.5 * 2).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    return hidden.to(device), weight.to(device), target.to(device)


def coefficients(n, seed=1, device="cpu"):
    """Upstream gradients with zeros and negatives, as advantages and ResRL weights produce. Index 0
    stays nonzero so that an N = 1 case still checks a gradient."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    coef[1::3] = 0.0
    return coef.to(device)


def run_both(hidden, weight, target, temperature, return_entropy, coef_lp, coef_ent):
    """Returns (outputs, grads) of the kernel and of the float64 reference on the same inputs (all on
    the inputs' device)."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = linear_logprob(h, w, target, temperature=temperature, return_entropy=return_entropy)
    loss = (lp * coef_lp.float()).sum()
    if return_entropy:
        loss = loss + (ent * coef_ent.float()).sum()
    loss.backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    lp64, ent64 = linear_logprob_reference(
        h64, w64, target, temperature=temperature, return_entropy=return_entropy
    )
    loss64 = (lp64 * coef_lp).sum()
    if return_entropy:
        loss64 = loss64 + (ent64 * coef_ent).sum()
    loss64.backward()
    return (lp, ent, h.grad, w.grad), (lp64, ent64, h64.grad, w64.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("return_entropy", [False, True], ids=["logprob", "logprob+entropy"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_reference(impl, device, shape, return_entropy, dtype):
    n, d, v = SHAPES[shape]
    hidden, weight, target = make_inputs(n, d, v, dtype, device=device)
    coef_lp, coef_ent = coefficients(n, device=device), coefficients(n, 2, device=device)
    got, want = run_both(hidden, weight, target, 1.0, return_entropy, coef_lp, coef_ent)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,) and got[0].device == hidden.device
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, a, b in zip(["logprob", "entropy", "grad_hidden", "grad_weight"], got, want, strict=False):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], f"{name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_in_forward_and_backward(impl, device, temperature):
    hidden, weight, target = make_inputs(29, 48, 97, torch.float32, seed=3, device=device)
    coef_lp, coef_ent = coefficients(29, device=device), coefficients(29, 4, device=device)
    got, want = run_both(hidden, weight, target, temperature, True, coef_lp, coef_ent)
    for a, b in zip(got, want, strict=False):
        assert rel_err(a, b) < TOL[torch.float32]


def test_entropy_only_gradient(impl, device):
    """The log-prob output unused: its upstream gradient arrives as None."""
    hidden, weight, target = make_inputs(21, 32, 77, torch.float32, seed=5, device=device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    _, ent = linear_logprob(h, w, target, return_entropy=True)
    ent.sum().backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    _, ent64 = linear_logprob_reference(h64, w64, target, return_entropy=True)
    ent64.sum().backward()
    assert rel_err(h.grad, h64.grad) < TOL[torch.float32]
    assert rel_err(w.grad, w64.grad) < TOL[torch.float32]


def test_all_zero_coefficients_give_zero_gradients(impl, device):
    hidden, weight, target = make_inputs(17, 32, 45, torch.float32, device=device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, _ = linear_logprob(h, w, target)
    (lp * 0.0).sum().backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_frozen_weight(impl, device):
    hidden, weight, target = make_inputs(13, 32, 40, torch.float32, device=device)
    h = hidden.clone().requires_grad_()
    lp, _ = linear_logprob(h, weight, target)
    lp.sum().backward()
    h64 = hidden.double().requires_grad_()
    linear_logprob_reference(h64, weight.double(), target)[0].sum().backward()
    assert rel_err(h.grad, h64.grad) < TOL[torch.float32]


def test_tied_embedding_weights(impl, device):
    """The LM head shares its matrix with the embedding: gradients from both uses add up."""
    n, d, v = 19, 32, 61
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    mix = (torch.randn(d, d, generator=g) * d**-0.5).to(device)
    weight = (torch.randn(v, d, generator=g) * 0.3).to(device)

    def loss_with(fn, w):
        hidden = torch.tanh(w[ids] @ mix)
        lp, _ = fn(hidden, w, target)
        return (lp * torch.linspace(-1, 1, n, dtype=lp.dtype, device=device)).sum()

    w = weight.clone().requires_grad_()
    loss_with(linear_logprob, w).backward()
    w64 = weight.double().requires_grad_()
    mix = mix.double()
    loss_with(linear_logprob_reference, w64).backward()
    assert rel_err(w.grad, w64.grad) < TOL[torch.float32]


def test_zero_tokens(impl, device):
    hidden, weight, _ = make_inputs(1, 32, 40, torch.float32, device=device)
    h = hidden[:0].clone().requires_grad_()
    lp, ent = linear_logprob(h, weight, torch.zeros(0, dtype=torch.long, device=device), return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 32)


class _AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # The Triton interpreter mirrors whole storages as uint8 buffers; those are not ours.
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_full_logits(impl, device, monkeypatch):
    """No N·V-element tensor among what the ops return and autograd saves, forward or backward, when
    N·V exceeds the budget. A dispatch mode is off inside a custom op's body, so this recorder sees the
    ops from outside; test_one_part_never_materializes_full_logits in
    tests/test_linear_logprob_two_part.py looks inside them."""
    n, d, v = 48, 32, 160
    monkeypatch.setattr(kernels.chunked, "CHUNK_BYTES", 16 * v * 4)
    monkeypatch.setenv("RESRL_WORKSPACE_MB", str(n * 64 * 4 / 2**20))
    hidden, weight, target = make_inputs(n, d, v, torch.float32, device=device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with _AllocationRecorder() as rec:
        lp, ent = linear_logprob(h, w, target, return_entropy=True)
        (lp.sum() - ent.sum()).backward()
    assert rec.largest < n * v, f"largest tensor has {rec.largest} elements >= N*V = {n * v}"
    assert rec.largest <= v * d  # the weight-sized gradient is the biggest thing allowed
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    lp64, ent64 = linear_logprob_reference(h64, w64, target, return_entropy=True)
    (lp64.sum() - ent64.sum()).backward()
    assert rel_err(w.grad, w64.grad) < TOL[torch.float32]
    assert rel_err(h.grad, h64.grad) < TOL[torch.float32]


# name: (kwargs override, expected exception, message fragment)
BAD_INPUTS = {
    "hidden_1d": (dict(hidden=torch.randn(32)), ValueError, "hidden must have 2 dims"),
    "hidden_int": (dict(hidden=torch.ones(4, 32, dtype=torch.long)), TypeError, "hidden has dtype int64"),
    "d_mismatch": (dict(weight=torch.randn(40, 31)), ValueError, "D must match"),
    "dtype_mismatch": (dict(weight=torch.randn(40, 32).bfloat16()), TypeError, "same dtype"),
    "target_length": (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target has 3 entries"),
    "target_float": (dict(target=torch.zeros(4)), TypeError, "target has dtype float32"),
    "target_too_big": (
        dict(target=torch.tensor([0, 1, 40, 2])),
        ValueError,
        r"outside the vocabulary \[0, 40\)",
    ),
    "target_negative": (dict(target=torch.tensor([0, -100, 1, 2])), ValueError, "outside the vocabulary"),
    "hidden_nan": (dict(hidden=torch.full((4, 32), float("nan"))), ValueError, "hidden contains NaN"),
    "weight_inf": (dict(weight=torch.full((40, 32), float("inf"))), ValueError, "weight contains NaN or Inf"),
    "device_mismatch": (
        dict(target=torch.zeros(4, dtype=torch.long, device="meta")),
        ValueError,
        "one device",
    ),
    "temperature_zero": (dict(temperature=0.0), ValueError, "temperature must be"),
}


def on(device, t):
    """A tensor argument moved to `device`, unless it is on the meta device on purpose."""
    return t.to(device) if isinstance(t, torch.Tensor) and not t.is_meta else t


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_rejected(impl, device, case):
    args = dict(hidden=torch.randn(4, 32), weight=torch.randn(40, 32), target=torch.tensor([0, 1, 2, 3]))
    override, exc, msg = BAD_INPUTS[case]
    args.update(override)
    args = {name: on(device, value) for name, value in args.items()}
    temperature = args.pop("temperature", 1.0)
    with pytest.raises(exc, match=msg):
        linear_logprob(args["hidden"], args["weight"], args["target"], temperature=temperature)


def test_unknown_impl_is_rejected(monkeypatch):
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="RESRL_KERNEL_IMPL='cuda-magic'.*triton.*torch"):
        linear_logprob(torch.randn(2, 32), torch.randn(5, 32), torch.tensor([0, 1]))


# ---- GPU only -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("return_entropy", [False, True])
def test_gpu_bf16_no_worse_than_plain_pytorch(monkeypatch, return_entropy):
    """bf16 on CUDA, forward and both gradients: the error against the float64 ground truth (on the
    same rounded inputs) no worse than plain bf16 PyTorch's plus 2e-3, and within TOL. N is no
    multiple of the 128-token block, V no power of two."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    n, d, v = 4001, 1024, 32003
    hidden, weight, target = make_inputs(n, d, v, torch.bfloat16, device="cuda")
    coef = coefficients(n, device="cuda")
    got, truth = run_both(hidden, weight, target, 1.0, return_entropy, coef, coef)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = torch.log_softmax((h @ w.T).float(), -1)  # plain bf16 matmul, fp32 softmax
    lp = logp.gather(1, target[:, None]).squeeze(1)
    loss = (lp * coef.float()).sum()
    ent = None
    if return_entropy:
        ent = -(logp.exp() * logp).sum(-1)
        loss = loss + (ent * coef.float()).sum()
    loss.backward()
    plain = (lp, ent, h.grad, w.grad)
    for name, a, p, t in zip(
        ["logprob", "entropy", "grad_hidden", "grad_weight"], got, plain, truth, strict=False
    ):
        if t is None:
            continue
        assert a.device.type == "cuda" and torch.isfinite(a).all(), name
        assert rel_err(a, t) <= rel_err(p, t) + 2e-3, (
            f"{name}: ours {rel_err(a, t):.2e} plain {rel_err(p, t):.2e}"
        )
        assert rel_err(a, t) < TOL[torch.bfloat16], f"{name}: rel err {rel_err(a, t):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_torch_path(monkeypatch, dtype):
    n, d, v = 3001, 512, 50257
    hidden, weight, target = make_inputs(n, d, v, dtype, device="cuda")
    outs = {}
    for impl in IMPLS:
        monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        lp, ent = linear_logprob(h, w, target, temperature=0.8, return_entropy=True)
        (lp.sum() + 0.5 * ent.sum()).backward()
        outs[impl] = (lp, ent, h.grad, w.grad)
    for a, b in zip(outs["triton"], outs["torch"], strict=False):
        assert rel_err(a, b) < TOL[dtype]
