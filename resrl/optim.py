"""The policy's optimizer, chosen by `optim.name`: torch's AdamW, or an AdamW that keeps its two
moments in 8 or 4 bits (torchao, bitsandbytes), registered here by name.

| optim.name    | class                        | state bytes per trained parameter             | FSDP2 |
|---------------|------------------------------|-----------------------------------------------|-------|
| adamw         | torch.optim.AdamW            | 8: two fp32 moments                           | yes   |
| adamw8bit     | torchao.optim.AdamW8bit      | 2 + 8/256: uint8 codes, fp32 scale per 256    | yes   |
| adamw4bit     | torchao.optim.AdamW4bit      | 1 + 8/128: 4-bit codes, fp32 scale per 128    | no    |
| adamw8bit-bnb | bitsandbytes.optim.AdamW8bit | 2 + 8/256: uint8 codes, fp32 absmax per 256   | no    |

Both libraries keep fp32 moments for tensors under 4096 values (norms, biases; torchao also for a
local shard whose size is not a multiple of its block), a negligible share of an LLM's parameters;
`state_bytes` counts one tensor exactly.

The "no" rows were checked with torch 2.13 on the CPU: torchao's AdamW4bit fails inside its
compiled step on DTensor parameters ("AssertionError: wrong number of dimensions1 for op: input")
and bitsandbytes' kernel takes no DTensor ("got mixed torch.Tensor and DTensor"). The trainer
shards the policy with several processes, `train.cpu_offload` or 16-bit compute (CUDA's default),
so those two run on one process with fp32 compute only. torchao compiles its step with
torch.compile (a C++ compiler on the CPU, Triton on CUDA); bitsandbytes steps wherever it has
registered a kernel (CPU and CUDA in 0.50).

Every optimizer here keeps each group's `lr` a Python float, as torch's AdamW does, so the
scheduler, `checkpoint.apply_optim_config` and the `optim/lr` metric treat them alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from resrl.config import ConfigError
from resrl.errors import MissingPackageError

if TYPE_CHECKING:
    from resrl.config import OptimConfig

LOWBIT_EXTRA = "pip install resrl[lowbit]"


@dataclass(frozen=True)
class OptimizerSpec:
    """One value of `optim.name`: where its class lives, what it can step, how it stores state."""

    module: str
    """Module holding the class (imported when the optimizer is built)."""
    cls: str
    """Class name in `module`."""
    requirement: str
    """The pip requirement that provides it (`torch` for the built-in)."""
    sharded: bool
    """Steps FSDP2-sharded (DTensor) parameters."""
    bits: int = 32
    """Bits per value of each of the two moments."""
    block: int = 0
    """Values per fp32 scale of a quantized moment (0: not quantized)."""

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    @property
    def label(self) -> str:
        return f"{self.package} {self.cls}"

    @property
    def state_bytes(self) -> float:
        """Bytes of state per trained parameter of a large tensor: two moments with their scales."""
        return 2 * (self.bits / 8 + (4 / self.block if self.block else 0))


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW", "torch", sharded=True),
    "adamw8bit": OptimizerSpec(
        "torchao.optim", "AdamW8bit", "torchao>=0.18", sharded=True, bits=8, block=256
    ),
    "adamw4bit": OptimizerSpec(
        "torchao.optim", "AdamW4bit", "torchao>=0.18", sharded=False, bits=4, block=128
    ),
    "adamw8bit-bnb": OptimizerSpec(
        "bitsandbytes.optim", "AdamW8bit", "bitsandbytes>=0.50", sharded=False, bits=8, block=256
    ),
}
# Both libraries keep fp32 moments for a tensor (a local shard) of fewer values.
QUANTIZE_MIN_NUMEL = 4096

# Device types torch.compile (torchao's step) targets.
_COMPILE_DEVICES = ("cpu", "cuda")
# bitsandbytes registers its kernels per dispatch key; these are the device types it may serve.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS", "hpu": "HPU"}
_BNB_STEP_OP = "bitsandbytes::optimizer_update_8bit_blockwise"


def state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per trained parameter for `optim.name` (large tensors)."""
    return OPTIMIZERS[name].state_bytes


def state_bytes(name: str, numel: int) -> int:
    """Bytes of optimizer state of one tensor of `numel` values (a rank's shard of a sharded one):
    both moments, their block scales and lookup tables, and the step count, as each library
    allocates them. Tensors under QUANTIZE_MIN_NUMEL values (and, in torchao, a tensor whose size
    is not a multiple of the block) keep fp32 moments."""
    spec = OPTIMIZERS[name]
    # torch and torchao count steps in a 0-d fp32 tensor per parameter, bitsandbytes in an int.
    step = 0 if spec.package == "bitsandbytes" else 4
    fp32 = not spec.block or numel < QUANTIZE_MIN_NUMEL or (spec.package == "torchao" and numel % spec.block)
    if fp32:
        return 2 * 4 * numel + step
    codes = numel * spec.bits // 8
    scales = 4 * -(-numel // spec.block)
    # torchao gives every moment its own code table; bitsandbytes shares one per device.
    table = 4 * 2**spec.bits if spec.package == "torchao" else 0
    return 2 * (codes + scales + table) + step


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `params` with cfg's lr, betas and weight decay.

    It steps where the parameters are (the CPU with `train.cpu_offload`). A choice that cannot step
    them (their device type, FSDP2 sharding, a missing C++ compiler) raises ConfigError, a missing
    library MissingPackageError; each is one line naming the setting, the reason and the choices
    that work here."""
    params = list(params)
    device_type = params[0].device.type if params else "cpu"
    sharded = any(isinstance(p, DTensor) for p in params)
    refusal = _refusal(cfg.name, device_type, sharded)
    if refusal is not None:
        error, reason = refusal
        usable = ", ".join(supported_here(device_type, sharded))
        raise error(
            f"config optim.name: {cfg.name} ({OPTIMIZERS[cfg.name].label}) {reason}; supported here: {usable}"
        )
    cls = _optimizer_class(cfg.name)
    return cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def supported_here(device_type: str, sharded: bool) -> list[str]:
    """The names of OPTIMIZERS that can step parameters of `device_type` (sharded or not) here."""
    return [name for name in OPTIMIZERS if _refusal(name, device_type, sharded) is None]


def _refusal(name: str, device_type: str, sharded: bool) -> tuple[type[Exception], str] | None:
    """Why `name` cannot step such parameters here (the exception to raise and a clause), or None."""
    spec = OPTIMIZERS[name]
    if spec.package == "torch":
        return None
    if sharded and not spec.sharded:
        return ConfigError, (
            "cannot step FSDP2-sharded (DTensor) parameters, and this run shards the policy (several "
            "processes, train.cpu_offload, or 16-bit compute); it runs in one process with "
            "model.dtype=float32 and no offload"
        )
    if spec.package == "torchao" and device_type not in _COMPILE_DEVICES:
        return (
            ConfigError,
            f"steps {' and '.join(_COMPILE_DEVICES)} parameters only, not {device_type} parameters",
        )
    if spec.package == "bitsandbytes" and device_type not in _DISPATCH_KEYS:
        return ConfigError, f"has no kernel for {device_type} parameters"
    if importlib.util.find_spec(spec.package) is None:
        return (
            MissingPackageError,
            f"needs {spec.requirement}, which is not installed here (`{LOWBIT_EXTRA}`)",
        )
    if spec.package == "torchao" and device_type == "cpu":
        missing = _missing_cpp_compiler()
        if missing:
            return (
                ConfigError,
                f"compiles its step with torch.compile, which finds no C++ compiler here ({missing})",
            )
    if spec.package == "bitsandbytes":
        bnb = _import_quietly("bitsandbytes")
        key = _DISPATCH_KEYS[device_type]
        if not torch._C._dispatch_has_kernel_for_dispatch_key(_BNB_STEP_OP, key):
            return (
                ConfigError,
                f"bitsandbytes {bnb.__version__} has no 8-bit optimizer kernel for {device_type} here",
            )
    return None


def _missing_cpp_compiler() -> str | None:
    """Inductor's own compiler search (CXX, then g++ and others): None when it finds one."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except ImportError:
        # Another torch layout: the first step will say what it lacks.
        return None
    except Exception as e:
        return str(e).strip().splitlines()[0]
    return None


def _import_quietly(module: str):
    """Import `module` without the import-time warnings of torchao (CUDA-only extensions that a CPU
    build of torch cannot load; the optimizers use none of them), bitsandbytes (a CPU matmul kernel
    looked up in a package named `kernels`, which is resrl's here) and torch's pytree deprecation
    notice that torchao triggers."""
    loggers = [logging.getLogger(n) for n in ("torchao", "bitsandbytes", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _FloatLr:
    """torchao's optimizers turn each group's lr into a tensor (so a new lr does not recompile their
    step) and refuse a float later; the scheduler, checkpoint loading and `apply_optim_config` write
    floats. This keeps the float in the group and hands the step a tensor of it."""

    def add_param_group(self, param_group: dict) -> None:
        torch.optim.Optimizer.add_param_group(self, param_group)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        floats = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, floats, strict=True):
                group["lr"] = lr


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    spec = OPTIMIZERS[name]
    try:
        cls = getattr(_import_quietly(spec.module), spec.cls)
    except (ImportError, AttributeError) as e:
        # Installed, but without the class (an older release, a broken install).
        raise MissingPackageError(
            f"config optim.name: {name} needs {spec.requirement} ({spec.module}.{spec.cls}): {e}; "
            f"`{LOWBIT_EXTRA}`"
        ) from None
    if spec.package == "torchao":
        return type(cls.__name__, (_FloatLr, cls), {"__module__": __name__})
    return cls
