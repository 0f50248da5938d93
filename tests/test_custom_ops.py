"""The kernels as torch custom ops: opcheck on each, and torch.compile through the trainer's forward.

The opchecks run on the `device` of their `impl` (tests/conftest.py: the Triton path on CUDA, or
under the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.linear_logprob import linear_logprob_backward_op, linear_logprob_op
from kernels.subspace import residual_weights_op, subspace_residual_op
from resrl.distributed import Policy
from resrl.model import build_qwen3
from tests.small import SMALL_MODEL


def lm_head_inputs(n=13, d=32, v=37, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.3).to(device).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=g).to(device)


@pytest.mark.parametrize("return_entropy", [False, True], ids=["logprob", "logprob+entropy"])
def test_opcheck_linear_logprob(impl, device, return_entropy):
    hidden, weight, target = lm_head_inputs(device=device)
    torch.library.opcheck(linear_logprob_op, (hidden, weight, target, 0.8, return_entropy, impl))


@pytest.mark.parametrize(
    "needs", [(True, True), (True, False), (False, True)], ids=["both", "hidden", "weight"]
)
def test_opcheck_linear_logprob_backward(impl, device, needs):
    hidden, weight, target = lm_head_inputs(device=device)
    hidden, weight = hidden.detach(), weight.detach()
    _, lse, ent = linear_logprob_op(hidden, weight, target, 0.8, True, impl)
    g = torch.Generator().manual_seed(1)
    grad_lp, grad_ent = (torch.randn(13, generator=g).to(device) for _ in range(2))
    torch.library.opcheck(
        linear_logprob_backward_op, (hidden, weight, target, lse, ent, grad_lp, grad_ent, 0.8, *needs, impl)
    )
    torch.library.opcheck(
        linear_logprob_backward_op, (hidden, weight, target, lse, ent, grad_lp, None, 0.8, *needs, impl)
    )


def two_part_inputs(n=13, d=32, d2=19, v=37, seed=5, device="cpu"):
    """lm_head_inputs plus a second part hidden2 [N, D2], weight2 [V, D2] (D2 != D)."""
    hidden, weight, target = lm_head_inputs(n, d, v, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    hidden2 = torch.relu(torch.randn(n, d2, generator=g)).to(device).requires_grad_()
    weight2 = (torch.randn(v, d2, generator=g) * 0.3).to(device).requires_grad_()
    return hidden, weight, target, hidden2, weight2


@pytest.mark.parametrize("return_entropy", [False, True], ids=["logprob", "logprob+entropy"])
def test_opcheck_linear_logprob_two_part(impl, device, return_entropy):
    hidden, weight, target, hidden2, weight2 = two_part_inputs(device=device)
    torch.library.opcheck(
        linear_logprob_op, (hidden, weight, target, 0.8, return_entropy, impl, hidden2, weight2)
    )


# (need_hidden, need_weight, need_hidden2, need_weight2)
TWO_PART_NEEDS = {
    "all": (True, True, True, True),
    "head_only": (False, False, True, True),  # R²PO's stage A
    "trunk_only": (True, True, False, False),
    "weights": (False, True, False, True),
}


@pytest.mark.parametrize("needs", list(TWO_PART_NEEDS.values()), ids=list(TWO_PART_NEEDS))
def test_opcheck_linear_logprob_backward_two_part(impl, device, needs):
    hidden, weight, target, hidden2, weight2 = (t.detach() for t in two_part_inputs(device=device))
    _, lse, ent = linear_logprob_op(hidden, weight, target, 0.8, True, impl, hidden2, weight2)
    g = torch.Generator().manual_seed(1)
    grad_lp, grad_ent = (torch.randn(13, generator=g).to(device) for _ in range(2))
    need_h, need_w, need_h2, need_w2 = needs
    for grad_entropy in (grad_ent, None):
        args = (hidden, weight, target, lse, ent, grad_lp, grad_entropy, 0.8, need_h, need_w, impl,
                hidden2, weight2, need_h2, need_w2)  # fmt: skip
        torch.library.opcheck(linear_logprob_backward_op, args)
        grads = linear_logprob_backward_op(*args)
        # Four outputs, [0] for each gradient not asked for, the input's shape otherwise.
        for grad, need, x in zip(grads, needs, (hidden, weight, hidden2, weight2), strict=True):
            assert grad.shape == (x.shape if need else (0,))


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "groups"])
def test_opcheck_subspace_residual(impl, device, grouped):
    g = torch.Generator().manual_seed(2)
    n, d, groups, k = 21, 40, 3, 5
    basis = torch.linalg.qr(torch.randn(groups, d, k, generator=g)).Q.to(device)
    mean = torch.randn(groups, d, generator=g).to(device)
    hidden = torch.randn(n, d, generator=g).to(device)
    if grouped:
        args = (hidden, basis, mean, torch.randint(0, groups, (n,), generator=g).to(device), impl)
    else:
        args = (hidden, basis[:1].contiguous(), mean[:1].contiguous(), None, impl)
    torch.library.opcheck(subspace_residual_op, args)


def test_opcheck_residual_weights(impl, device):
    g = torch.Generator().manual_seed(3)
    n = 30
    dist = torch.rand(n, generator=g).to(device)
    group = torch.randint(0, 4, (n,), generator=g).to(device)
    valid = (torch.rand(n, generator=g) > 0.2).to(device)
    torch.library.opcheck(residual_weights_op, (dist, group, valid, 0.2, 0.8, 0.1, impl))


def test_fake_tensors_give_shapes_without_data():
    """Shape-only tracing (as `resrl estimate` does): the public functions run under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(1000, 64, requires_grad=True)
        weight = torch.empty(50000, 64, requires_grad=True)
        lp, ent = kernels.linear_logprob(
            hidden, weight, torch.zeros(1000, dtype=torch.long), return_entropy=True
        )
        (lp.sum() + ent.sum()).backward()
        dist = kernels.subspace_residual(hidden.detach(), torch.empty(4, 64, 8), torch.empty(4, 64),
                                         torch.zeros(1000, dtype=torch.long))  # fmt: skip
        w = kernels.residual_weights(
            dist, torch.zeros(1000, dtype=torch.long), torch.ones(1000, dtype=torch.bool)
        )
    assert lp.shape == ent.shape == dist.shape == w.shape == (1000,)
    assert hidden.grad.shape == (1000, 64) and weight.grad.shape == (50000, 64)


def test_fake_tensors_two_part_give_shapes_without_data():
    """The two-part form under FakeTensorMode: gradients only for the tensors that require them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(1000, 64)
        weight = torch.empty(50000, 64)
        hidden2 = torch.empty(1000, 48, requires_grad=True)
        weight2 = torch.empty(50000, 48, requires_grad=True)
        lp, ent = kernels.linear_logprob(
            hidden, weight, torch.zeros(1000, dtype=torch.long), return_entropy=True,
            hidden2=hidden2, weight2=weight2,
        )  # fmt: skip
        (lp.sum() + ent.sum()).backward()
    assert lp.shape == ent.shape == (1000,)
    assert hidden2.grad.shape == (1000, 48) and weight2.grad.shape == (50000, 48)
    assert hidden.grad is None and weight.grad is None


def small_policy(vocab: int) -> Policy:
    kwargs = {k.removeprefix("model."): int(v) for k, v in (o.split("=") for o in SMALL_MODEL)}
    return Policy(build_qwen3(vocab, **kwargs))


@pytest.mark.parametrize("subspace_layer", [None, "penultimate"], ids=["update", "prepass"])
def test_compiled_policy_forward_and_backward_equal_eager(monkeypatch, subspace_layer):
    """torch.compile (aot_eager, CPU) of the trainer's forward: log-probs, entropies, captured hidden
    states and every parameter gradient equal eager's, with the kernel an opaque op in the graph.

    The update's forward (no subspace layer) must be one graph. The pre-pass's ("penultimate")
    is three: `resrl.model.HiddenCapture`, a context manager registering a hook, breaks the graph.
    """
    monkeypatch.setenv("RESRL_KERNEL_IMPL", "torch")
    vocab, b, seq = 97, 3, 11
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, vocab, (b, seq), generator=g)
    attention_mask = torch.ones(b, seq, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding, as the trainer's rollouts have
    coef = torch.randn(b, seq - 1, generator=g)

    def step(policy):
        out = policy(
            input_ids, attention_mask, temperature=0.7, return_entropy=True, subspace_layer=subspace_layer
        )
        loss = (out["logprob"] * coef).sum() + 0.1 * out["entropy"].sum()
        loss.backward()
        grads = {
            n.removeprefix("_orig_mod."): p.grad.clone()
            for n, p in policy.named_parameters()
            if p.grad is not None
        }
        return out, grads

    eager = small_policy(vocab)
    compiled = small_policy(vocab)
    want, want_grads = step(eager)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    got, got_grads = step(torch.compile(compiled, backend=backend))
    assert any("resrl.linear_logprob.default" in targets for targets in graphs)
    if subspace_layer is None:
        # No graph break, the kernel's value checks included.
        assert len(graphs) == 1, f"{len(graphs)} graphs: torch.compile broke the forward"
    keys = ("logprob", "entropy") + (("sub_hidden",) if subspace_layer else ())
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
