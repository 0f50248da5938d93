"""linear_logprob with a second part (hidden2 [N, D2], weight2 [V, D2]) against the concatenated form.

The oracle is the one-part float64 reference on cat([h, h2], -1) and cat([W, W2], -1)
(`kernels.reference.linear_logprob_two_part_reference`). Both paths at small shapes, each on the
`device` of its `impl` (tests/conftest.py: the Triton one on CUDA, or under the interpreter on the
CPU): outputs and all four gradients, every needs-grad combination (with the GEMMs that ran
recorded), a zero head equal bitwise to the one-part call, and the memory property (nothing of N·V
elements, no [V, D+D2] or [N, D+D2] concatenation).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.chunked
from kernels import linear_logprob
from kernels.linear_logprob import linear_logprob_backward_op, linear_logprob_op
from kernels.reference import linear_logprob_two_part_reference

IMPLS = ["torch", "triton"]
# Relative (to the max magnitude) error allowed against float64 on the same rounded inputs, on
# every device, as for the one-part form (tests/test_linear_logprob.py).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
NAMES = ("hidden", "weight", "hidden2", "weight2")

# name: (N, D, D2, V). Primes: no dimension is a multiple of any block (interpreter blocks are
# 16 x 32 x 32, CUDA's 64 or 128), and D2 spans several K-steps of its own loop.
SHAPES = {
    "primes": (37, 41, 23, 131),
    "one_token": (1, 31, 17, 53),
    "wide_head": (11, 13, 67, 97),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def make_inputs(n, d, d2, v, dtype, seed=0, device="cpu"):
    """(hidden, weight, hidden2, weight2, target); the head part at the trunk's logit scale. Drawn
    on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * d**-0.5 * 2).to(dtype)
    hidden2 = torch.relu(torch.randn(n, d2, generator=g)).to(dtype)
    weight2 = (torch.randn(v, d2, generator=g) * d2**-0.5 * 2).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    return tuple(x.to(device) for x in (hidden, weight, hidden2, weight2, target))


def coefficients(n, seed=1, device="cpu"):
    """Upstream gradients with zeros and negatives, as advantages and ResRL weights produce.

    Every third entry from the second on is zero, so a single token keeps a nonzero coefficient
    (zeroing the first would make N = 1 gradient checks compare zeros with zeros)."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    coef[1::3] = 0.0
    assert n < 3 or ((coef < 0).any() and (coef > 0).any())
    return coef.to(device)


def run_kernel(inputs, target, temperature, return_entropy, coef_lp, coef_ent, needs=(True,) * 4):
    """(logprob, entropy, [grad of each of the four tensors, None where not required])."""
    xs = [x.clone().requires_grad_(need) for x, need in zip(inputs, needs, strict=True)]
    h, w, h2, w2 = xs
    lp, ent = linear_logprob(
        h, w, target, temperature=temperature, return_entropy=return_entropy, hidden2=h2, weight2=w2
    )
    if any(needs):
        loss = (lp * coef_lp.float()).sum()
        if return_entropy:
            loss = loss + (ent * coef_ent.float()).sum()
        loss.backward()
    return lp, ent, [x.grad for x in xs]


def run_reference(inputs, target, temperature, return_entropy, coef_lp, coef_ent):
    xs = [x.double().requires_grad_() for x in inputs]
    lp, ent = linear_logprob_two_part_reference(
        xs[0], xs[1], xs[2], xs[3], target, temperature=temperature, return_entropy=return_entropy
    )
    loss = (lp * coef_lp).sum()
    if return_entropy:
        loss = loss + (ent * coef_ent).sum()
    loss.backward()
    return lp, ent, [x.grad for x in xs]


def assert_close_to_reference(got, want, dtype):
    lp, ent, grads = got
    lp64, ent64, grads64 = want
    pairs = [("logprob", lp, lp64), ("entropy", ent, ent64)]
    pairs += [(f"grad_{name}", a, b) for name, a, b in zip(NAMES, grads, grads64, strict=True)]
    for name, a, b in pairs:
        if a is None:
            continue
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], f"{name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("return_entropy", [False, True], ids=["logprob", "logprob+entropy"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_concatenated_reference(impl, device, shape, return_entropy, dtype):
    n, d, d2, v = SHAPES[shape]
    *inputs, target = make_inputs(n, d, d2, v, dtype, device=device)
    coef_lp, coef_ent = coefficients(n, device=device), coefficients(n, 2, device=device)
    got = run_kernel(inputs, target, 1.0, return_entropy, coef_lp, coef_ent)
    want = run_reference(inputs, target, 1.0, return_entropy, coef_lp, coef_ent)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,) and got[0].device == target.device
    assert (got[1] is None) == (not return_entropy)
    for x, grad in zip(inputs, got[2], strict=True):
        assert grad.dtype == dtype and grad.shape == x.shape
    assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_in_forward_and_backward(impl, device, temperature):
    *inputs, target = make_inputs(29, 24, 19, 97, torch.float32, seed=3, device=device)
    coef_lp, coef_ent = coefficients(29, device=device), coefficients(29, 4, device=device)
    got = run_kernel(inputs, target, temperature, True, coef_lp, coef_ent)
    want = run_reference(inputs, target, temperature, True, coef_lp, coef_ent)
    assert_close_to_reference(got, want, torch.float32)
    # The temperature is applied to the sum of both parts, not to one of them.
    other = run_kernel(inputs, target, 1.0, True, coef_lp, coef_ent)
    assert rel_err(other[0], want[0]) > 1e-3


def test_entropy_only_gradient(impl, device):
    """The log-prob output unused: its upstream gradient arrives as None."""
    *inputs, target = make_inputs(21, 16, 24, 77, torch.float32, seed=5, device=device)
    coef = coefficients(21, 6, device=device)
    xs = [x.clone().requires_grad_() for x in inputs]
    _, ent = linear_logprob(xs[0], xs[1], target, return_entropy=True, hidden2=xs[2], weight2=xs[3])
    (ent * coef.float()).sum().backward()
    x64 = [x.double().requires_grad_() for x in inputs]
    _, ent64 = linear_logprob_two_part_reference(*x64, target, return_entropy=True)
    (ent64 * coef).sum().backward()
    for name, x, y in zip(NAMES, xs, x64, strict=True):
        assert rel_err(x.grad, y.grad) < TOL[torch.float32], name


class _InsideOpsMode(TorchDispatchMode):
    """Sees every aten op, those inside the custom ops included.

    A dispatch mode sees `resrl::linear_logprob` and its backward as single opaque calls and is
    off while their bodies run; here their Python bodies run under the mode instead (as `resrl
    estimate` does), so the workspaces and matrix products they make are recorded too."""

    BODIES = {
        torch.ops.resrl.linear_logprob.default: linear_logprob_op._init_fn,
        torch.ops.resrl.linear_logprob_backward.default: linear_logprob_backward_op._init_fn,
    }

    def __init__(self):
        super().__init__()
        self.bodies_run = 0

    def record(self, func, out) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = self.BODIES.get(func)
        if body is None:
            out = func(*args, **(kwargs or {}))
            self.record(func, out)
            return out
        self.bodies_run += 1
        with self:
            return body(*args, **(kwargs or {}))


class _MatmulRecorder(_InsideOpsMode):
    """The output shape of every matrix product (mm/addmm, in place or out=)."""

    OPS = {"mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def record(self, func, out) -> None:
        if func.overloadpacket.__name__ in self.OPS:
            self.shapes.add(tuple(out.shape))


COMBOS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize(
    "needs", COMBOS, ids=["".join("1" if x else "0" for x in c) + "_hWh2W2" for c in COMBOS]
)
def test_every_needs_grad_combination(impl, device, needs):
    """Each tensor gets a gradient iff it requires one, equal to the reference's, and only the
    products of the gradients asked for run: with N, D, D2, V all distinct, grad_hidden is the only
    [N, D] product, grad_weight the only [V, D], grad_hidden2 [N, D2], grad_weight2 [V, D2] (the
    logits are [N, V]; one token chunk and one vocabulary chunk at these sizes). R²PO's stage A is
    needs = (False, False, True, True): no GEMM of the trunk's or the LM head's gradient."""
    n, d, d2, v = 13, 24, 40, 53
    *inputs, target = make_inputs(n, d, d2, v, torch.float32, seed=7, device=device)
    coef_lp, coef_ent = coefficients(n, device=device), coefficients(n, 8, device=device)
    with _MatmulRecorder() as rec:
        got = run_kernel(inputs, target, 0.9, True, coef_lp, coef_ent, needs)
    want = run_reference(inputs, target, 0.9, True, coef_lp, coef_ent)
    assert rec.bodies_run == (2 if any(needs) else 1)  # the forward op, and the backward op if any
    assert got[0].requires_grad == any(needs)
    for name, need, grad in zip(NAMES, needs, got[2], strict=True):
        assert (grad is not None) == need, f"grad_{name}: needed {need}, got {grad is not None}"
    assert_close_to_reference(got, want, torch.float32)
    gradient_products = {(n, d): needs[0], (v, d): needs[1], (n, d2): needs[2], (v, d2): needs[3]}
    ran = rec.shapes - {(n, v)}
    assert ran == {shape for shape, need in gradient_products.items() if need}, (
        f"matrix products run: {sorted(rec.shapes)}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero", ["hidden2", "weight2"])
def test_zero_head_is_bitwise_the_one_part_result(impl, device, zero, dtype):
    """A zero second part (R²PO's head at init std 0: W2 = 0, or h2 = ReLU(·) = 0) changes nothing:
    log-prob, entropy and the trunk's and LM head's gradients equal the one-part call's bit for bit.

    On CUDA the 16-bit two-part forward walks D in 32-wide K tiles and the one-part in 64-wide ones
    (`_tile_config`): the same 16-deep tensor-core steps in the same order into one fp32
    accumulator, so this holds there too, and the bf16 case on a GPU checks it."""
    n, d, d2, v = 23, 37, 19, 101
    hidden, weight, hidden2, weight2, target = make_inputs(n, d, d2, v, dtype, seed=9, device=device)
    if zero == "hidden2":
        hidden2 = torch.zeros_like(hidden2)
    else:
        weight2 = torch.zeros_like(weight2)
    coef_lp, coef_ent = coefficients(n, device=device), coefficients(n, 10, device=device)
    lp, ent, grads = run_kernel((hidden, weight, hidden2, weight2), target, 0.8, True, coef_lp, coef_ent)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp1, ent1 = linear_logprob(h, w, target, temperature=0.8, return_entropy=True)
    ((lp1 * coef_lp.float()).sum() + (ent1 * coef_ent.float()).sum()).backward()
    for name, a, b in [("logprob", lp, lp1), ("entropy", ent, ent1), ("grad_hidden", grads[0], h.grad),
                       ("grad_weight", grads[1], w.grad)]:  # fmt: skip
        assert torch.equal(a, b), f"{name}: max diff {(a.double() - b.double()).abs().max():.3e}"
    if zero == "hidden2":  # dzᵀ·h2 with h2 = 0
        assert torch.count_nonzero(grads[3]) == 0
    else:  # dz·W2 with W2 = 0
        assert torch.count_nonzero(grads[2]) == 0


def test_zero_tokens(impl, device):
    *inputs, _ = make_inputs(1, 16, 8, 40, torch.float32, device=device)
    xs = [x.clone().requires_grad_() for x in inputs]
    xs[0], xs[2] = (x[:0].detach().clone().requires_grad_() for x in (xs[0], xs[2]))
    no_target = torch.zeros(0, dtype=torch.long, device=device)
    lp, ent = linear_logprob(xs[0], xs[1], no_target, return_entropy=True, hidden2=xs[2], weight2=xs[3])
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert xs[0].grad.shape == (0, 16) and xs[2].grad.shape == (0, 8)
    assert torch.count_nonzero(xs[1].grad) == 0 and torch.count_nonzero(xs[3].grad) == 0
    assert xs[1].grad.shape == (40, 16) and xs[3].grad.shape == (40, 8)


class _AllocationRecorder(_InsideOpsMode):
    """Every tensor an op returns, inside the custom ops too: the largest element count, every shape."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def record(self, func, out) -> None:
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # The Triton interpreter mirrors whole storages as uint8 buffers; those are not ours.
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))


def test_never_materializes_full_logits_or_a_concatenation(impl, device, monkeypatch):
    """No tensor of N·V or V·(D+D2) elements and none with a D+D2 dimension, on either path, in the
    forward or the backward, with the workspace budgets set so chunks are well below N·V (several
    token chunks on the PyTorch path, several vocabulary chunks in the Triton backward)."""
    n, d, d2, v = 48, 32, 24, 160  # D+D2 = 56 is no other dimension of any tensor involved
    monkeypatch.setattr(kernels.chunked, "CHUNK_BYTES", 16 * v * 4)  # 16-token chunks
    monkeypatch.setenv("RESRL_WORKSPACE_MB", str(n * 64 * 4 / 2**20))  # 64-column dz chunks
    *inputs, target = make_inputs(n, d, d2, v, torch.float32, seed=11, device=device)
    coef_lp, coef_ent = coefficients(n, device=device), coefficients(n, 12, device=device)
    with _AllocationRecorder() as rec:
        got = run_kernel(inputs, target, 1.0, True, coef_lp, coef_ent)
    assert rec.bodies_run == 2  # the workspaces inside the forward and backward ops were seen
    assert WORKSPACE[impl](n, v) in rec.shapes, sorted(rec.shapes)
    assert rec.largest < n * v, f"largest tensor has {rec.largest} elements >= N*V = {n * v}"
    assert rec.largest < v * (d + d2)
    assert rec.largest <= v * d  # the LM head's gradient is the biggest thing allowed
    assert not [s for s in rec.shapes if d + d2 in s], f"a [.., D+D2] tensor: {sorted(rec.shapes)}"
    want = run_reference(inputs, target, 1.0, True, coef_lp, coef_ent)
    assert_close_to_reference(got, want, torch.float32)


# The chunk workspace each path makes at the budgets set below: a 16-token chunk of logits on
# the PyTorch path, a 64-column dz chunk in the Triton backward (the budget is 64 fp32 columns;
# fp32 blocks are 32 columns in the interpreter and 64 on CUDA, so 64 on both). Seeing it proves
# the recorder looks inside the custom ops.
WORKSPACE = {"torch": lambda n, v: (16, v), "triton": lambda n, v: (n, 64)}


def test_one_part_never_materializes_full_logits(impl, device, monkeypatch):
    """The same property for the one-part form (hidden2=None), seen inside the custom ops:
    tests/test_linear_logprob.py's recorder sees only the ops' outputs, since a dispatch mode is
    off while a custom op's body runs."""
    n, d, v = 48, 32, 160
    monkeypatch.setattr(kernels.chunked, "CHUNK_BYTES", 16 * v * 4)
    monkeypatch.setenv("RESRL_WORKSPACE_MB", str(n * 64 * 4 / 2**20))
    hidden, weight, _, _, target = make_inputs(n, d, 8, v, torch.float32, seed=13, device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _AllocationRecorder() as rec:
        lp, ent = linear_logprob(h, w, target, return_entropy=True)
        (lp.sum() - ent.sum()).backward()
    assert rec.bodies_run == 2
    assert WORKSPACE[impl](n, v) in rec.shapes, sorted(rec.shapes)
    assert rec.largest < n * v, f"largest tensor has {rec.largest} elements >= N*V = {n * v}"
    assert rec.largest <= v * d


# name: (kwargs override, message fragment). Every one is a one-line ValueError.
BAD_SECOND_PART = {
    "hidden2_without_weight2": (dict(weight2=None), "hidden2 was given without weight2"),
    "weight2_without_hidden2": (dict(hidden2=None), "weight2 was given without hidden2"),
    "hidden2_not_a_tensor": (dict(hidden2=[[0.0] * 8] * 4), "hidden2 must be a torch.Tensor or None, got list"),
    "hidden2_1d": (dict(hidden2=torch.randn(8)), r"hidden2 must have 2 dims, got shape \(8,\)"),
    "weight2_3d": (dict(weight2=torch.randn(40, 8, 1)), "weight2 must have 2 dims"),
    "hidden2_bf16": (
        dict(hidden2=torch.randn(4, 8).bfloat16()),
        r"hidden2 has dtype bfloat16; accepted: float32 \(the dtype of hidden and weight\)",
    ),
    "weight2_int": (dict(weight2=torch.ones(40, 8, dtype=torch.long)), "weight2 has dtype int64; accepted: float32"),
    "hidden2_rows": (dict(hidden2=torch.randn(5, 8)), "hidden2 has 5 rows but hidden has N=4: N must match"),
    "weight2_rows": (dict(weight2=torch.randn(41, 8)), "weight2 has 41 rows but weight has V=40: V must match"),
    "d2_mismatch": (dict(weight2=torch.randn(40, 9)), r"hidden2 is \[N=4, D2=8\] but weight2 is \[V=40, D2=9\]"),
    "hidden2_device": (dict(hidden2=torch.empty(4, 8, device="meta")), "one device; got .*hidden2 on meta"),
    "hidden2_nan": (dict(hidden2=torch.full((4, 8), float("nan"))), "hidden2 contains NaN or Inf"),
    "weight2_inf": (dict(weight2=torch.full((40, 8), float("inf"))), "weight2 contains NaN or Inf"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SECOND_PART), ids=list(BAD_SECOND_PART))
def test_bad_second_part_is_rejected_in_one_line(impl, device, case):
    args = dict(
        hidden=torch.randn(4, 32), weight=torch.randn(40, 32), target=torch.tensor([0, 1, 2, 3]),
        hidden2=torch.randn(4, 8), weight2=torch.randn(40, 8),
    )  # fmt: skip
    override, msg = BAD_SECOND_PART[case]
    args.update(override)
    # To the case's device, except a tensor on the meta device on purpose (and the non-tensors).
    args = {k: x.to(device) if isinstance(x, torch.Tensor) and not x.is_meta else x for k, x in args.items()}
    with pytest.raises(ValueError, match=msg) as info:
        linear_logprob(**args)
    assert "\n" not in str(info.value)


# ---- GPU only -------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_two_part_bf16_matches_float64_reference(monkeypatch):
    """bf16 on CUDA, forward and all four gradients, against the float64 concatenated reference on
    the same rounded inputs within TOL: N no multiple of the 128-token block, V no power of two, D2
    no multiple of the 32-wide K tile."""
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "triton")
    n, d, d2, v = 3001, 512, 200, 50257
    *inputs, target = make_inputs(n, d, d2, v, torch.bfloat16, device="cuda")
    coef_lp, coef_ent = coefficients(n, device="cuda"), coefficients(n, 2, device="cuda")
    got = run_kernel(inputs, target, 0.8, True, coef_lp, coef_ent)
    want = run_reference(inputs, target, 0.8, True, coef_lp, coef_ent)
    assert got[0].device.type == "cuda"
    for x, grad in zip(inputs, got[2], strict=True):
        assert grad.dtype == torch.bfloat16 and grad.shape == x.shape
    assert_close_to_reference(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_two_part_triton_matches_torch_path(monkeypatch, dtype):
    """R²PO's shape of head (D2 = D) at a vocabulary that is not a block multiple, both paths on CUDA."""
    n, d, v = 3001, 512, 50257
    *parts, target = make_inputs(n, d, d, v, dtype, device="cuda")
    coef_lp, coef_ent = coefficients(n, device="cuda"), coefficients(n, 2, device="cuda")
    outs = {}
    for impl in IMPLS:
        monkeypatch.setenv("RESRL_KERNEL_IMPL", impl)
        outs[impl] = run_kernel(parts, target, 0.8, True, coef_lp, coef_ent)
    tri, ref = outs["triton"], outs["torch"]
    names = ("logprob", "entropy", *(f"grad_{name}" for name in NAMES))
    for name, a, b in zip(names, [*tri[:2], *tri[2]], [*ref[:2], *ref[2]], strict=True):
        assert rel_err(a, b) < TOL[dtype], f"{name}: rel err {rel_err(a, b):.2e}"
