"""Implementation selection and input validation shared by the public kernel functions."""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake

IMPLS = ("triton", "torch")


def select_impl(device: torch.device) -> str:
    """`RESRL_KERNEL_IMPL` if set (`triton` or `torch`), else `triton` on CUDA and `torch` elsewhere."""
    impl = os.environ.get("RESRL_KERNEL_IMPL", "").strip().lower()
    if not impl:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in IMPLS:
        raise ValueError(f"RESRL_KERNEL_IMPL={impl!r} is not supported; use one of {IMPLS}")
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "RESRL_KERNEL_IMPL=triton on a non-CUDA tensor needs TRITON_INTERPRET=1 set before "
            "triton is imported (Triton's CPU interpreter); otherwise use RESRL_KERNEL_IMPL=torch"
        )
    return impl


def value_checks_enabled() -> bool:
    """`RESRL_KERNEL_CHECKS=0` skips value checks (finiteness, index ranges): one host sync per call."""
    return os.environ.get("RESRL_KERNEL_CHECKS", "1").strip() != "0"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (bf16 `tl.dot` is wrong there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t: object, ndim: int | tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; accepted: {names}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device; got {listing}")


def raise_if_any(checks: dict[str, torch.Tensor]) -> None:
    """Evaluate several boolean device scalars with a single host sync; raise on the first true one.

    Under `torch.compile` the checks become asserts in the graph (`torch._assert_async`: a
    RuntimeError with the same message, no graph break); on fake or meta tensors (shapes only,
    as in `resrl estimate`) there are no values to check.
    """
    if not checks:
        return
    if torch.compiler.is_compiling():
        for msg, bad in checks.items():
            torch._assert_async(~bad.reshape(()), msg)
        return
    if any(is_fake(c) or c.device.type == "meta" for c in checks.values()):
        return
    flags = torch.stack([c.reshape(()) for c in checks.values()]).tolist()
    for msg, bad in zip(checks, flags, strict=False):
        if bad:
            raise ValueError(msg)
