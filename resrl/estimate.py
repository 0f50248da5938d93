"""Peak memory of one RL step at real shapes, estimated on the CPU with fake tensors.

`resrl estimate --model qwen3-4b` runs the phases of a training step on a Qwen3-shaped model whose
tensors have shapes but no data (`FakeTensorMode`), through the project's own forward
(`resrl.distributed.Policy` over `forward_logprobs`, or bench/bench_step.py's `reference_forward`
for the reference recipe's path: full fp32 logits and every layer's hidden states), and counts
the bytes of live tensors with a dispatch-level tracker (`MemoryTracker`), per rank, on the device
and on the host. The trainer's step itself is not pushed through: it reads metrics back to the
host (`.item()`, `.tolist()`), which tensors without data cannot do. The phases, as
`Trainer.train_step` runs them in a steady state (step 2 on: gradients and AdamW state of the
previous step are alive until the next optimizer step zeroes them):

- load: the model built in fp32 on the CPU in every rank (`resrl.loading.load_model`), moved to
  the GPU (without offload), then sharded (under LoRA: the base in the compute dtype, its fp32
  adapters injected, then sharded); the frozen KL reference's build when there is one;
- pre-pass: one micro-batch forward under no_grad with the subspace hidden state captured, while
  the positive pool of every mixed group of this rank is held (the pre-pass visits positives first
  and keeps their captured hidden states until the first negative), the reference model's forward
  when there is one, then one group's basis;
- update: the forward and backward of one micro-batch (the LM head on response rows only, the
  loss formed inside the pass), with the gradients of earlier micro-batches alive;
- optimizer: gradient clipping and the optimizer's step (its state created on the first step).

The optimizer (`optim.name`, `Mode.optim`; `resrl.optim`): adamw (torch's AdamW, two fp32 moments,
8 bytes per trained parameter) is stepped as torch's AdamW on the fake tensors, as before; the
low-bit ones keep their state as `resrl.optim.state_bytes` counts it per tensor (a rank's shard),
~2.03 bytes (adamw8bit, adamw8bit-bnb) or ~1.06 (adamw4bit) per parameter, fp32 moments for
tensors under 4096 values, allocated as the libraries allocate it (codes, block scales, torchao's
code tables, the step count); their step is not run but modelled (`_lowbit_step`). "16 bytes per
trained parameter" below is adamw's: 8 + the optimizer's state bytes per parameter in general
(adamw8bit: 10.03). adamw4bit and adamw8bit-bnb step no FSDP2-sharded parameters: the trainer
refuses them, and so does the estimate, in every sharded mode (bf16 compute, several processes,
offload): fp32 compute on one process without offload only.

How the trainer holds the model (the mode follows `--dtype`, `--world-size`, `--offload`, `--lora-rank`):
- bf16 compute (`model.dtype=bfloat16`, or auto on CUDA), any number of processes: FSDP2
  `fully_shard` per decoder block, then the root (`Policy`: embeddings, final norm, LM head),
  `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`. Per rank: fp32 master shards,
  fp32 gradient shards and two fp32 AdamW states, 16 bytes per trained parameter / world size,
  stepped by the optimizer here as fake fp32 tensors (its foreach temporaries count). The
  forward runs on bf16 compute copies, modelled by `_Fsdp` with hooks on the fake bf16 model: a
  block's copy is gathered before its forward and freed after it, gathered again at its backward
  (with one process each parameter's shard is cast and copied into its compute copy in turn;
  with several every shard is cast, then an all-gather buffer lives beside them and the copy:
  the forward keeps each until the next unit's copy-out, the backward prefetches); the root's
  copy is gathered by the first forward and freed only at the end of a backward (FSDP2 never
  reshards its root after a forward), so it lives through the pre-pass into the update. With
  several processes the backward prefetches: the root's pre-backward (the loss's gradient)
  all-gathers the last block, whose buffer lives through the LM head's backward; each block's
  pre-backward copies its gathered buffer out into its compute copy, then all-gathers the block
  before (the buffer beside the running block, no copy-out until that block's own pre-backward).
  Each unit's gradients are formed in bf16, copied into one fp32 reduce-scatter buffer (kept
  until the next unit's reduction), reduced, and added to the fp32 gradient shards.
- `--offload` (`train.cpu_offload`): masters, gradients and AdamW state on the host, where the
  optimizer step runs (for-loop AdamW); the device holds the compute copies, the reduce
  buffers, activations and kernel workspaces. Host load: the whole fp32 model, built on the host
  in every rank before sharding.
- fp32 compute, one process, no offload: the plain module, fp32 weights + gradients + AdamW
  (16 bytes per parameter), no compute copy. fp32 with several processes or offload: FSDP2
  without a mixed-precision policy (fp32 compute copies).
- `--lora-rank R` (model.lora_rank, `resrl.lora`): the fake model gets peft's adapters through
  `resrl.lora.apply` (A [R, in], B [out, R] in q, k, v, o, gate, up, down of every block) and runs
  the project's forward and backward with them: the adapters' activations, and a backward that
  forms no weight gradient for the frozen base, LM head and embeddings (the fused LM-head kernel
  skips its weight GEMM), are measured. Under FSDP2 the base's shards stay in the compute dtype
  (bf16: 2 bytes per parameter / world size; FSDP2 offloads them too with `--offload`), the
  adapters' are fp32 masters with fp32 gradients and AdamW state (16 bytes per adapter parameter
  / world size), the only ones stepped; the compute copies per unit (base and adapters, bf16) and
  the root's as for full fine-tuning; the reduce buffers hold the adapters' gradients only. Load:
  the base built in the compute dtype (2 B/param on the host, then the GPU without offload). fp32
  in one process: the plain module, the base in fp32.
- `--kl-reference` (algorithm.kl_coef > 0, or ACE): a frozen copy sharded like the policy in the
  compute dtype (2 bytes per parameter / world size, on the host with offload; a LoRA run's is its
  base); its root's copy, gathered by its first forward and never freed (no backward reshards
  it), stays on the device.

Workspaces inside the kernels' custom ops are invisible to a tracker above `FakeTensorMode` (a
fake implementation allocates only the outputs), so the tracker runs each op's own Python body
on the fake inputs instead, with the Triton launches replaced by no-ops: every host allocation of
the real op (the forward's split partials, the backward's dz [N, VC] chunk and fp32 [N, D]
accumulator, the chunked path's [C, V] logits) is counted. `subspace_basis` has a data-dependent
rank; a shape-only stand-in allocates what it does with k = min(rank, M' - 1, D).

What the estimate leaves out: the CUDA context, cuBLAS and attention-kernel workspaces, NCCL
buffers, and the caching allocator's fragmentation (`--reserve` GiB stands for them in "fits");
the rollout engine (vLLM sleeps during these phases); the process's own host memory (Python,
libraries, a checkpoint read from disk). Sequences are taken at full prompt + response length,
the worst case for a peak. FSDP2's buffers are modelled from its source (torch 2.13), not run:
`measure_cpu` runs the real FSDP2 (a one-process gloo group, or rank 0 of a fake group of several
processes), and the tests hold the two together within 1% (tests/test_estimate.py).

`resrl estimate --json` prints one JSON object. For one model:
    {"model": str, "params": int (trained parameters, tied embeddings once; LoRA: the adapters'),
     "frozen_params": int (LoRA: the base's; else 0),
     "mode": {"dtype", "world_size", "offload", "kl_reference", "lora_rank": int (0: full
              fine-tuning), "sharding": "fsdp2" | "none", "state_bytes_per_param": 16 (per
              trained parameter: fp32 weight and gradient, 8, plus the optimizer's state; adamw8bit
              10.03125)},
     "optimizer": {"name": optim.name, "class": str, "state_bytes": int (the optimizer's state of
                   this rank, `resrl.optim.state_bytes` of each tensor it steps: its shards under
                   FSDP2, the adapters' under LoRA), "state_bytes_per_param": float (8 for adamw),
                   "where": "device" | "host" (offload)},
     "batch": {the StepShape fields}, "capacity_gib": [float], "reserve_gib": float,
     "path": "resrl", "device_peak_bytes": int, "host_peak_bytes": int,
     "phases": {"load" | "prepass" | "update" | "optimizer": {"device_bytes": int, "host_bytes": int}},
     "fits": {"<capacity_gib>": bool},
     "paths": {"resrl" | "reference": {"device_peak_bytes", "host_peak_bytes", "phases", "fits"}}}
The top-level figures are those of the trainer's path ("resrl") when it was estimated (else of
the first path asked); `paths` holds every path estimated. Bytes are per rank; "device" is the
GPU (the CPU itself for a CPU run). Several models: {"models": [one such object per model]}.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resrl.errors import InputError
from resrl.optim import OPTIMIZERS, state_bytes, state_bytes_per_param

# The modules (the package's names `kernels.linear_logprob` is the function of that name).
_LL = importlib.import_module("kernels.linear_logprob")
_FL = importlib.import_module("kernels.fused_loss")

GIB = 2**30
PHASES = ("load", "prepass", "update", "optimizer")
PATHS = ("resrl", "reference")
DTYPES = ("bfloat16", "float32")
# What the CUDA caching allocator rounds every block up to.
CUDA_BLOCK = 512
# Streaming multiprocessors of an H100/H200 (SXM): how many vocabulary splits the forward kernel uses.
HOPPER_SMS = 132
# fp32 master weight, fp32 gradient, two fp32 AdamW states (optim.name=adamw, the default; the
# others: `Mode.state_bytes_per_param`).
STATE_BYTES = 16
# fp32 master weight and fp32 gradient of a trained parameter, beside the optimizer's state.
WEIGHT_GRAD_BYTES = 8


def _bench_step():
    """bench/bench_step.py (Qwen3 shapes, the reference path), from the repository beside the package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "bench_step.py").is_file():
        raise InputError(
            "resrl estimate needs the repository's bench/bench_step.py (an editable install: pip install -e .)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import bench.bench_step

    return bench.bench_step


def model_names() -> list[str]:
    return [k for k in _bench_step().MODELS if k.startswith("qwen3")]


@dataclass
class StepShape:
    """The batch of one RL step (defaults: the qwen3-4b-math-resrl preset, the ResRL paper's recipe)."""

    prompts: int = 256
    """Prompts per step (train.prompts_per_step), over all ranks."""
    n: int = 4
    """Responses per prompt (rollout.n)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step (train.mini_batch_prompts), over all ranks."""
    prompt_len: int = 2048
    """Prompt tokens (data.max_prompt_length); every sequence is taken at full length."""
    response_len: int = 4096
    """Response tokens (rollout.max_new_tokens)."""
    micro_batch_size: int = 8
    """Sequences per padded micro-batch (train.micro_batch_size), when micro_batch_tokens is 0."""
    micro_batch_tokens: int = 0
    """Packed micro-batches of at most this many tokens (train.pack with
    train.max_tokens_per_micro_batch); 0: padded micro-batches of micro_batch_size sequences."""
    positives: int = 2
    """Positive responses per group (every group mixed: the largest pre-pass pool for a given count)."""
    subspace_rank: int = 64
    subspace_max_tokens: int = 4096
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        for name in ("prompts", "n", "mini_batch_prompts", "prompt_len", "response_len", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_tokens < 0:
            raise InputError(f"--micro-batch-tokens must be >= 0, got {self.micro_batch_tokens}")
        if not 0 <= self.positives <= self.n:
            raise InputError(f"--positives must be in [0, n={self.n}], got {self.positives}")
        if self.prompts % self.mini_batch_prompts:
            raise InputError(
                f"--prompts {self.prompts} must be a multiple of --mini-batch-prompts {self.mini_batch_prompts}"
            )

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def seqs_per_micro_batch(self) -> int:
        if self.micro_batch_tokens:
            return max(1, self.micro_batch_tokens // self.seq_len)
        return self.micro_batch_size

    def micro_batches_per_update(self, world_size: int = 1) -> int:
        """Micro-batches of one rank per optimizer step."""
        return math.ceil(self.mini_batch_prompts * self.n / world_size / self.seqs_per_micro_batch)


@dataclass(frozen=True)
class Mode:
    """How the trainer holds the model (module docstring); per rank."""

    dtype: str = "bfloat16"
    """Compute dtype (model.dtype)."""
    world_size: int = 1
    """Processes, one per GPU, over which FSDP2 shards."""
    offload: bool = False
    """train.cpu_offload: masters, gradients and AdamW state on the host."""
    kl_reference: bool = False
    """A frozen reference model (algorithm.kl_coef > 0, or ACE)."""
    device: str = "cuda"
    """"cuda": the Triton kernels' host code, foreach AdamW, 512-byte blocks; "cpu": the PyTorch
    kernels, for-loop AdamW, exact bytes (what `measure_cpu` measures)."""
    lora_rank: int = 0
    """model.lora_rank: > 0 trains LoRA adapters of this rank on a frozen base (`resrl.lora`)."""
    optim: str = "adamw"
    """optim.name: the optimizer whose state is counted (`resrl.optim.OPTIMIZERS`)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
        if self.world_size < 1:
            raise InputError(f"--world-size must be >= 1, got {self.world_size}")
        if self.lora_rank < 0:
            raise InputError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.device not in ("cuda", "cpu"):
            raise InputError(f"device {self.device!r}: accepted cuda, cpu")
        if self.optim not in OPTIMIZERS:
            raise InputError(f"optim.name {self.optim!r} is unknown; accepted: {', '.join(OPTIMIZERS)}")
        spec = OPTIMIZERS[self.optim]
        if self.sharded and not spec.sharded:
            # What `resrl.optim.build_optimizer` refuses in the trainer (DTensor parameters).
            why = [
                *(["--world-size > 1"] * (self.world_size > 1)),
                *(["--offload"] * self.offload),
                *(["--dtype bfloat16"] * (self.dtype != "float32")),
            ]
            raise InputError(
                f"optim.name {self.optim} ({spec.label}) cannot step FSDP2-sharded parameters, and this "
                f"mode shards the policy ({', '.join(why)}); it runs in one process with --dtype float32 "
                "and no --offload; sharded modes take: "
                + ", ".join(n for n, o in OPTIMIZERS.items() if o.sharded)
            )

    @property
    def optim_state_bytes_per_param(self) -> float:
        """Bytes of the optimizer's state per trained parameter (large tensors): adamw 8."""
        return state_bytes_per_param(self.optim)

    @property
    def state_bytes_per_param(self) -> float:
        """fp32 weight (master), fp32 gradient and the optimizer's state per trained parameter."""
        return WEIGHT_GRAD_BYTES + self.optim_state_bytes_per_param

    @property
    def sharded(self) -> bool:
        return self.dtype != "float32" or self.world_size > 1 or self.offload

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def describe(self) -> str:
        w = self.world_size
        if self.device == "cuda":
            ranks, where = f"{w} GPU{'s' * (w > 1)}", "the GPU"
        else:
            ranks, where = f"{w} CPU process{'es' * (w > 1)}", "the CPU"
        where = "the host" if self.offload else where
        per = f" / {w}" if w > 1 else ""
        compute = "bf16" if self.dtype == "bfloat16" else "fp32"
        size = self.compute_dtype.itemsize
        spec = OPTIMIZERS[self.optim]
        opt = "AdamW" if self.optim == "adamw" else f"{spec.cls} ({spec.package})"
        b = f"{self.state_bytes_per_param:.2f}".rstrip("0").rstrip(".")
        if not self.sharded:
            text = f"fp32 on {ranks}: plain module, weights, gradients and {opt} state ({b} B/param)"
            if self.lora:
                text = (
                    f"LoRA rank {self.lora_rank}, fp32 on {ranks}: plain module, frozen base (4 B/param), "
                    f"adapters' weights, gradients and {opt} state ({b} B/adapter param)"
                )
        elif self.lora:
            text = (
                f"LoRA rank {self.lora_rank}, {compute} compute on {ranks}: FSDP2, frozen {compute} base "
                f"({size} B/param{per}) and the adapters' fp32 masters, gradients and {opt} state "
                f"({b} B/adapter param{per}) on {where}"
            )
        else:
            text = (
                f"{compute} compute on {ranks}: FSDP2, fp32 master "
                f"weights, gradients and {opt} state on {where} ({b} B/param{per})"
            )
        return text + (f", a frozen KL reference ({size} B/param)" if self.kl_reference else "")


@dataclass
class Estimate:
    model: str
    path: str
    mode: Mode
    params: int
    """Trained parameters (under LoRA: the adapters')."""
    frozen: int = 0
    """Frozen parameters of the policy (under LoRA: the base's)."""
    device: dict[str, int] = field(default_factory=dict)
    """Peak live device bytes per phase (per rank)."""
    host: dict[str, int] = field(default_factory=dict)
    """Peak live host bytes per phase (per rank): tensors the trainer places there."""
    optimizer_state: int = 0
    """Bytes of the optimizer's state of this rank (`resrl.optim.state_bytes` of every tensor it
    steps), on the device, or on the host with offload."""

    @property
    def device_peak(self) -> int:
        return max(self.device.values())

    @property
    def host_peak(self) -> int:
        return max(self.host.values())

    def fits(self, capacity_gib: float, reserve_gib: float) -> bool:
        return self.device_peak <= (capacity_gib - reserve_gib) * GIB

    def figures(self, capacities: list[float], reserve_gib: float) -> dict:
        return {
            "device_peak_bytes": self.device_peak,
            "host_peak_bytes": self.host_peak,
            "phases": {k: {"device_bytes": self.device[k], "host_bytes": self.host[k]} for k in PHASES},
            "fits": {f"{c:g}": self.fits(c, reserve_gib) for c in capacities},
        }


# --------------------------------------------------------------------------- the tracker


class MemoryTracker(TorchDispatchMode):
    """Live bytes of tensor storages on the device and on the host, and their peaks.

    A storage counts from the op that creates it (on the device, or on the host inside
    `on_host()`) until its last reference dies (a weakref finalizer on the storage); a registered
    tensor with `where=None` (a compute copy whose bytes `_Fsdp` holds) costs nothing. `hold`
    and `spike` add modelled bytes: held until released, or a transient at one moment. The
    kernels' custom ops run their own Python body here (see the module docstring), so their
    workspaces count. Scalars read back to the host (value checks, range checks) read as 1 or
    False: no allocation depends on them.
    """

    def __init__(self, round_to: int = 1, workspaces: dict | None = None) -> None:
        super().__init__()
        self.round_to = round_to
        self.workspaces = _ATEN_WORKSPACE if workspaces is None else workspaces
        self.live = {"device": 0, "host": 0}
        self.peak = dict(self.live)
        self.where = "device"
        self._refs: dict[int, weakref.ref] = {}
        self._holds: dict[object, tuple[str, int]] = {}
        self.peaks: dict[str, dict[str, int]] = {}
        """Peak bytes of each finished `phase`: {"device": ..., "host": ...}."""

    def bytes_of(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to if nbytes else 0

    def register(self, t: torch.Tensor, where: str | None = "device") -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._refs:
            return
        n = self.bytes_of(st.nbytes()) if where else 0
        account = where or "device"

        def release(_ref, key=key, n=n, account=account):
            self._refs.pop(key, None)
            self.live[account] -= n

        self._refs[key] = weakref.ref(st, release)
        self.live[account] += n
        self.mark()

    def mark(self) -> None:
        for k, v in self.live.items():
            self.peak[k] = max(self.peak[k], v)

    def hold(self, key: object, nbytes: int, where: str = "device") -> None:
        if key in self._holds:
            return
        self._holds[key] = (where, nbytes)
        self.live[where] += nbytes
        self.mark()

    def held(self, key: object) -> bool:
        return key in self._holds

    def release(self, key: object) -> None:
        if key in self._holds:
            where, nbytes = self._holds.pop(key)
            self.live[where] -= nbytes

    def spike(self, nbytes: int, where: str = "device") -> None:
        self.peak[where] = max(self.peak[where], self.live[where] + nbytes)

    @contextlib.contextmanager
    def on_host(self, host: bool = True) -> Iterator[None]:
        previous, self.where = self.where, ("host" if host else self.where)
        try:
            yield
        finally:
            self.where = previous

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.peak = dict(self.live)
        yield
        self.peaks[name] = dict(self.peak)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return False if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        body = _OP_BODIES.get(func)
        if body is not None:
            with self:
                out = body()(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.register(t, self.where)
        workspace = self.workspaces.get(func)
        if workspace is not None:
            self.spike(self.bytes_of(workspace(*args)), self.where)
        return out


# The custom ops whose Python body runs under the tracker instead of their fake implementation.
_OP_BODIES: dict[object, Callable[[], Callable]] = {
    torch.ops.resrl.linear_logprob.default: lambda: _LL.linear_logprob_op._init_fn,
    torch.ops.resrl.linear_logprob_backward.default: (lambda: _LL.linear_logprob_backward_op._init_fn),
}


# Temporaries that aten kernels allocate inside one op (a fake kernel allocates only the output):
# logsumexp forms exp(x - max) at the input's size before reducing it (the PyTorch kernels' path).
_ATEN_WORKSPACE: dict[object, Callable[..., int]] = {
    torch.ops.aten.logsumexp.default: lambda x, *rest: x.numel() * x.element_size(),
}


def _cpu_flash_attention(q, k, *rest) -> int:
    """The per-thread buffers of ATen's CPU flash-attention forward (FlashAttentionKernel.cpp):
    fp32 q·k tile, row max and sum, output tile; a bf16 copy of the q·k tile for bf16 inputs."""
    qs = min(q.shape[2], 256 if q.shape[2] >= 768 else 64 if q.shape[2] >= 192 else 32)
    ks = min(k.shape[2], 512)
    per_thread = 4 * (qs * ks + 2 * qs + qs * q.shape[3]) + (
        q.element_size() * qs * ks if q.element_size() < 4 else 0
    )
    return torch.get_num_threads() * per_thread


# Only where the estimate is of a CPU run: on a GPU the attention kernels' workspaces are the reserve's.
_CPU_WORKSPACE = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_attention}


class _Allocator:
    """The meter of a real run: phases as profiler ranges; `measure_cpu` reads the CPU allocator's
    running total inside them. Registration and modelled bytes are the tracker's business."""

    def register(self, t: torch.Tensor, where: str | None = "device") -> None:
        pass

    def on_host(self, host: bool = True):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"estimate:{name}"):
            yield


class _NoLaunch:
    """A Triton kernel that does nothing when launched (the host code around it still allocates)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _hopper_splits(n: int, v: int, block_n: int, block_v: int, device: torch.device) -> int:
    """`kernels.linear_logprob._num_splits` as on an H100/H200 (HOPPER_SMS multiprocessors)."""
    n_blocks = -(-n // block_n)
    v_tiles = -(-v // block_v)
    return max(1, min(v_tiles, -(-4 * HOPPER_SMS // n_blocks)))


@contextlib.contextmanager
def _kernel_impl(impl: str) -> Iterator[None]:
    """The kernels' `impl` path on fake CPU tensors: "torch" as on a CPU; "triton" as on a GPU,
    its host code (tiles for CUDA, workspaces) run with the kernel launches replaced by no-ops
    and the fp32 accumulation done in place, as cuBLAS does it (no fp32 copies of its operands)."""
    if impl == "torch":
        with (
            mock.patch.object(_LL, "select_impl", lambda device: "torch"),
            mock.patch.object(_FL, "select_impl", lambda device: "torch"),
        ):
            yield
        return
    ll = _LL
    with (
        mock.patch.object(ll, "select_impl", lambda device: "triton"),
        mock.patch.object(_FL, "select_impl", lambda device: "triton"),
        mock.patch.object(ll, "interpreting", lambda: False),
        mock.patch.object(ll, "_logprob_fwd_kernel", _NoLaunch()),
        mock.patch.object(ll, "_dlogits_kernel", _NoLaunch()),
        mock.patch.object(ll, "_num_splits", _hopper_splits),
        mock.patch.object(ll, "_accumulate_mm", lambda acc, a, b: None),
    ):
        yield


# --------------------------------------------------------------------------- FSDP2, modelled


def _shard_shape(p: torch.Tensor, world: int) -> tuple[int, ...]:
    """FSDP2's shard of `p` on one rank: dim 0 split in `world` chunks, padded to equal ones."""
    return (-(-p.shape[0] // world), *p.shape[1:]) if p.dim() else ()


class _Fsdp:
    """FSDP2 as the trainer applies it (module docstring), on a fake model in the compute dtype
    whose parameters stand for the compute copies: hooks hold and release their bytes on the
    tracker, and the fp32 shards the optimizer steps are fake tensors where the trainer keeps
    them. Units: each decoder block, then the root (every other parameter)."""

    def __init__(self, policy, meter: MemoryTracker, mode: Mode) -> None:
        self.meter, self.mode, self.world = meter, mode, mode.world_size
        self.place = "host" if mode.offload else "device"
        layers = list(policy.model.model.layers)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        root = [p for p in policy.parameters() if id(p) not in in_layers]
        self.units = [list(layer.parameters()) for layer in layers] + [root]
        self.root = len(layers)
        compute = mode.compute_dtype.itemsize
        # Trained parameters' shards are fp32 masters; frozen ones (a LoRA base) stay in the
        # compute dtype they were loaded in (FSDP2 casts nothing for them).
        trained = [[p.requires_grad for p in u] for u in self.units]
        self._trained = [sum(t) for t in trained]
        padded = [[math.prod(_shard_shape(p, self.world)) * self.world for p in u] for u in self.units]
        grads = [
            sum(n for n, t in zip(u, ts, strict=True) if t) for u, ts in zip(padded, trained, strict=True)
        ]
        self.copy = [sum(meter.bytes_of(n * compute) for n in u) for u in padded]
        self.reduce_in = [meter.bytes_of(4 * g) for g in grads]
        self.reduce_out = [meter.bytes_of(4 * g // self.world) for g in grads]
        self.gather = [
            self._gather_peak(u, ts, compute, meter) for u, ts in zip(padded, trained, strict=True)
        ]
        for p in policy.parameters():
            meter.register(p, None)
        for b in policy.buffers():
            meter.register(b)
        with meter.on_host(mode.offload):
            shards = [
                [
                    torch.empty(_shard_shape(p, self.world), dtype=torch.float32 if t else mode.compute_dtype)
                    for p, t in zip(u, ts, strict=True)
                ]
                for u, ts in zip(self.units, trained, strict=True)
            ]
        self.shards = [
            [s for s, t in zip(u, ts, strict=True) if t] for u, ts in zip(shards, trained, strict=True)
        ]
        self.frozen = [
            s for u, ts in zip(shards, trained, strict=True) for s, t in zip(u, ts, strict=True) if not t
        ]
        if mode.kl_reference:
            # The reference: the policy's model without adapters (a LoRA run's is its base).
            adapters = _adapter_ids(policy)
            n = sum(
                math.prod(_shard_shape(p, self.world)) for p in policy.parameters() if id(p) not in adapters
            )
            meter.hold("reference shards", meter.bytes_of(compute * n), self.place)
            meter.hold("reference root", self.copy[self.root])
        self._ready = [0] * len(self.units)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._pre_forward, i))
            layer.register_forward_hook(functools.partial(self._post_forward, i))
            for p in layer.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i))
        policy.register_forward_pre_hook(lambda module, args: self._unshard(self.root, forward=True))
        policy.register_forward_hook(self._root_post_forward)
        self._prefetched: set[int] = set()
        self._root_backward = False

    @property
    def train(self) -> list[torch.Tensor]:
        return [s for u in self.shards for s in u]

    def _gather_peak(self, padded: list[int], trained: list[bool], compute: int, meter: MemoryTracker) -> int:
        """The bytes an unshard of one unit allocates at its fullest (FSDP2's `unshard` and
        `wait_for_unshard`), beside what was live, parameters in FSDP2's order. A parameter's
        all-gather input: its shard copied to the device (offload; the shard itself otherwise),
        cast to the compute dtype when it is a trained fp32 master (a frozen one is already in it).
        One process: no collective; parameter after parameter, the input is made (the previous
        one still referenced), then its compute copy allocated beside it and filled. Several: every
        input made, then the flat all-gather buffer (the whole unit in the compute dtype) beside
        them (the copy-out comes after, `_unshard`)."""
        w, offload = self.world, self.mode.offload
        peak = copies = previous = inputs = 0
        for n, t in zip(padded, trained, strict=True):
            shard = n // w
            orig = meter.bytes_of(shard * (4 if t else compute))
            cast = meter.bytes_of(shard * compute) if t and compute != 4 else 0
            made = cast or (orig if offload else 0)
            transient = (orig if offload else 0) + cast
            if w == 1:
                peak = max(peak, copies + previous + transient)
                copies += meter.bytes_of(n * compute)
                peak = max(peak, copies + made)
                previous = made
            else:
                peak = max(peak, inputs + transient)
                inputs += made
        if w > 1:
            peak = max(peak, inputs + meter.bytes_of(compute * sum(padded)))
        return peak

    def _unshard(self, i: int, forward: bool = False, prefetch: bool = False) -> None:
        """Unit i's compute copy, held until resharded. With several processes the all-gather
        fills a flat buffer first, and the copy-out allocates the copy beside it. A prefetched
        unit (the backward's) holds the buffer (same bytes as the copy) until its own
        pre-backward, where the copy-out takes its place; in the forward each buffer is kept
        until the next unit's copy-out (to overlap the two). With one process there is no
        buffer: the prefetch allocates nothing, the copy is made at the unit's own unshard."""
        m = self.meter
        if i in self._prefetched:
            self._prefetched.discard(i)
            m.spike(self.copy[i])
            return
        if m.held(("copy", i)) or (prefetch and self.world == 1):
            return
        if self.world == 1:
            # Each shard (cast to the compute dtype) copied into its new compute copy.
            m.spike(self.gather[i])
            m.hold(("copy", i), self.copy[i])
            return
        # The cast shard copied into the flat buffer and gathered; then the copy-out beside it.
        m.spike(self.gather[i])
        m.hold(("copy", i), self.copy[i])
        if prefetch:
            self._prefetched.add(i)
            return
        m.spike(self.copy[i])
        if forward:
            m.release("all-gather buffer")
            m.hold("all-gather buffer", self.copy[i])

    def _root_post_forward(self, module, args, out) -> None:
        """The root's post-forward frees the last block's all-gather buffer; its pre-backward
        (the first gradient of one of its outputs: the loss) prefetches the last block, whose
        buffer then lives through the LM head's backward."""
        self.meter.release("all-gather buffer")
        if torch.is_grad_enabled():
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad: self._root_pre_backward())

    def _root_pre_backward(self) -> None:
        if not self._root_backward:
            self._root_backward = True
            self._unshard(self.root - 1, prefetch=True)

    def _pre_forward(self, i: int, module, args) -> None:
        # A checkpointed block's recomputation: its copy was gathered at its pre-backward.
        if torch._C._current_graph_task_id() == -1:
            self._unshard(i, forward=True)

    def _post_forward(self, i: int, module, args, out) -> None:
        if torch._C._current_graph_task_id() != -1:
            return
        self.meter.release(("copy", i))
        if torch.is_grad_enabled():
            grads = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if grads:
                grads[0].register_hook(lambda grad: self._pre_backward(i))

    def _pre_backward(self, i: int) -> None:
        self._unshard(i)
        # The backward prefetches the block before: its all-gather (module docstring).
        if i > 0:
            self._unshard(i - 1, prefetch=True)

    def _grad_ready(self, i: int, p) -> None:
        self._ready[i] += 1
        if self._ready[i] == self._trained[i]:
            self._ready[i] = 0
            self._post_backward(i)

    def _post_backward(self, i: int) -> None:
        """Reshard, then reduce: the unit's gradients copied into an fp32 buffer (the previous
        unit's freed first), reduced into a new shard, added to the fp32 gradient shards."""
        m = self.meter
        m.release(("copy", i))
        m.release("reduce-scatter input")
        m.hold("reduce-scatter input", self.reduce_in[i])
        for p in self.units[i]:
            p.grad = None
        m.spike(self.reduce_out[i])
        if self.mode.offload:
            m.spike(self.reduce_out[i], "host")
        with m.on_host(self.mode.offload):
            for s in self.shards[i]:
                if s.grad is None:
                    s.grad = torch.empty_like(s)

    def end_backward(self) -> None:
        """The root's post-backward and the release of the last reduce-scatter input."""
        self._post_backward(self.root)
        self.meter.release("reduce-scatter input")
        self._root_backward = False


# --------------------------------------------------------------------------- the phases


def _qwen3(dims: dict, dtype: torch.dtype, shape: StepShape):
    from resrl.model import build_qwen3

    previous = torch.get_default_dtype()
    # Built directly in the compute dtype: converting fake parameters afterwards is not supported.
    torch.set_default_dtype(dtype)
    try:
        model = build_qwen3(
            dims["vocab"],
            hidden_size=dims["hidden"],
            num_layers=dims["layers"],
            num_heads=dims["heads"],
            num_kv_heads=dims["kv"],
            # bench_step's head_dim: 128 for every Qwen3 size (32 for its tiny smoke model).
            head_dim=dims.get("head_dim", 32 if dims["hidden"] < 128 else 128),
            intermediate_size=dims["mlp"],
            max_position_embeddings=shape.seq_len + 8,
            tie_word_embeddings=dims["tied"],
        )
    finally:
        torch.set_default_dtype(previous)
    if shape.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _adapter_ids(module: torch.nn.Module) -> set[int]:
    """The LoRA adapters' parameters of `module` (none without LoRA)."""
    from resrl.lora import ADAPTER

    pieces = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")
    return {id(p) for name, p in module.named_parameters() if any(k in name for k in pieces)}


def _inject_lora(net, rank: int, dtype: torch.dtype, *, fake: bool) -> None:
    """`resrl.lora.apply` as the trainer calls it: the base (built in `dtype`) frozen, fp32
    adapters of `rank` in every linear layer of the decoder blocks. On fake tensors `Module.to`
    is a no-op: the base is already in `dtype` (fake parameters cannot be converted in place), and
    the adapters' round trip through the base's dtype ends in fp32 either way."""
    from resrl import lora
    from resrl.config import Config

    cfg = Config()
    cfg.model.lora_rank = rank
    no_to = mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    with no_to if fake else contextlib.nullcontext():
        lora.apply(net, cfg, dtype)


def micro_batch(shape: StepShape, vocab: int) -> dict[str, torch.Tensor]:
    """Model inputs of one full micro-batch (`RolloutBatch.collate`, real tensors: it selects rows
    by value, which fake tensors cannot)."""
    from resrl.batch import RolloutBatch

    s = shape.seqs_per_micro_batch
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (shape.prompt_len,), generator=gen).tolist() for _ in range(s)]
    responses = [torch.randint(0, vocab, (shape.response_len,), generator=gen).tolist() for _ in range(s)]
    batch = RolloutBatch.scored(prompts, responses, [True] * s, list(range(s)))
    return batch.collate(list(range(s)), 0, torch.device("cpu"), packed=shape.micro_batch_tokens > 0)


def _forward(policy, t: dict, **kwargs) -> dict:
    return policy(t["input_ids"], t.get("attention_mask"), position_ids=t.get("position_ids"), **kwargs)


def _basis_standin(pool_MD: torch.Tensor, rank: int, max_tokens: int) -> torch.Tensor:
    """What `kernels.subspace_basis` allocates, shapes only: subsample, LN in fp32, centre, the
    randomized range finder's [M', k + 10] and [D, k + 10] factors, the basis [D, k]."""
    m, d = pool_MD.shape
    if m > max_tokens:
        pool_MD = pool_MD[:max_tokens].clone()
    pool_MD = torch.nn.functional.layer_norm(pool_MD.float(), (d,))
    a_MD = pool_MD - pool_MD.mean(0)
    k = min(rank, a_MD.shape[0] - 1, d)
    width = min(k + 10, a_MD.shape[0], d)
    q_ML = a_MD @ a_MD.new_empty(d, width)
    q_DL = a_MD.T @ q_ML
    b_LD = q_ML.T @ a_MD
    return (b_LD[:k].T + q_DL[:, :k]).contiguous()


def _prepass(policy, meter, shape: StepShape, t: dict, d: int, dtype: torch.dtype, mode: Mode) -> None:
    """The pre-pass at its fullest: every positive micro-batch's captured hidden states of this
    rank held, then the micro-batch that reaches the first negative (the reference model's forward
    after the policy's), then one group's basis."""
    s = shape.seqs_per_micro_batch
    need_old = shape.prompts > shape.mini_batch_prompts
    mixed = 0 < shape.positives < shape.n
    positives = math.ceil(shape.prompts / mode.world_size) * shape.positives if mixed else 0
    pools = [torch.empty(s * shape.response_len, d, dtype=dtype) for _ in range(positives // s)]
    for p in pools:
        meter.register(p)
    with torch.no_grad():
        out = _forward(
            policy,
            t,
            positions=t["positions"],
            subspace_layer="penultimate" if mixed else None,
            logprobs=need_old,
        )
        if mode.kl_reference:
            # The frozen copy's forward has the policy's shapes: the same fake model runs it.
            ref = _forward(policy, t, positions=t["positions"])
            del ref
        if mixed:
            group_pool = torch.cat([out["sub_hidden"][: shape.response_len]] * shape.positives)
            basis = _basis_standin(group_pool, shape.subspace_rank, shape.subspace_max_tokens)
            del group_pool, basis
    del pools, out


def _update(policy, t: dict, fsdp: _Fsdp | None) -> None:
    """One micro-batch forward and backward through the loss formed inside the LM-head pass."""
    from resrl.algorithms import PolicyTokenLoss

    m = t["positions"].shape[0]
    token_loss = PolicyTokenLoss(torch.ones(m), torch.full((m,), 1.0 / m), sample_logprob=torch.zeros(m))
    policy.train()
    out = _forward(policy, t, positions=t["positions"], return_entropy=True, token_loss=token_loss)
    out["loss"].backward()
    del out
    if fsdp is not None:
        fsdp.end_backward()


def state_allocations(name: str, numel: int) -> list[int]:
    """The bytes of each tensor `optim.name` allocates as the state of one tensor of `numel` values
    (a rank's shard): per moment its uint8 codes, fp32 block scales and (torchao) fp32 code table,
    or an fp32 moment for a tensor it does not quantize; the step count (torch's and torchao's a
    0-d fp32 tensor, bitsandbytes' a Python int). They add up to `resrl.optim.state_bytes`."""
    spec = OPTIMIZERS[name]
    step = [] if spec.package == "bitsandbytes" else [4]
    total = state_bytes(name, numel)
    if total == 2 * 4 * numel + sum(step):
        return [4 * numel, 4 * numel, *step]
    table = [4 * 2**spec.bits] if spec.package == "torchao" else []
    moment = [numel * spec.bits // 8, 4 * -(-numel // spec.block), *table]
    out = [*moment, *moment, *step]
    assert sum(out) == total, (name, numel, out, total)
    return out


def _lowbit_step(train: list[torch.Tensor], meter: MemoryTracker, name: str) -> list[torch.Tensor]:
    """A low-bit optimizer's state for the tensors `train` (fake, on the meter's side: the device,
    or the host under `on_host`) and its step's temporaries, modelled, not run (torchao compiles
    its step, bitsandbytes runs its own kernel; neither runs on fake tensors). Returns the state
    (alive as long as the caller holds it). The state is allocated whole first (the steady state:
    it exists from step 2 on), then the step's transient peak:

    - torchao (adamw8bit, adamw4bit) steps one parameter at a time (`single_param_adam` compiled
      by torch.compile, no foreach): the moments are dequantized, updated in fp32 and quantized
      back per block, and the parameter update reads the fp32 moments. ASSUMPTION (not measured
      here, torchao is not installed in CI): inductor materializes both new moments in fp32, two
      fp32 buffers of the tensor's size (8 B/value), of one tensor at a time, so the step's peak is
      the state plus 8 B x the largest tensor stepped (an upper bound: a kernel that fuses the
      block reduction with its consumers materializes less).
    - bitsandbytes (adamw8bit-bnb) updates parameter, codes and absmax in place in one fused
      blockwise kernel per tensor (fp32 tensors under 4096 values: its 32-bit kernel, in place
      too): no temporaries of a tensor's size (the shared 256-value code tables are negligible).
    """
    if not isinstance(meter, MemoryTracker):
        raise NotImplementedError(f"optim.name {name}: a real step is not measured here, only estimated")
    spec = OPTIMIZERS[name]
    state = [torch.empty(n, dtype=torch.uint8) for p in train for n in state_allocations(name, p.numel())]
    if spec.package == "torchao" and train:
        largest = max(p.numel() for p in train)
        meter.spike(2 * meter.bytes_of(4 * largest), meter.where)
    return state


def run_phases(
    policy,
    meter,
    shape: StepShape,
    inputs: dict[str, torch.Tensor],
    mode: Mode,
    *,
    train: list[torch.Tensor],
    fsdp: _Fsdp | None = None,
) -> None:
    """The step's phases on `policy` (fake or real tensors) in a steady state, each inside
    `meter.phase(name)`: the optimizer step first (it creates the optimizer state every later
    phase lives with), then the pre-pass, then one update micro-batch. `train`: what the optimizer
    steps (the parameters, or the fp32 shards `fsdp` models), with their gradients of a step.
    `mode.optim`: adamw is torch's AdamW stepped here; a low-bit one's state and step are modelled
    (`_lowbit_step`, the fake-tensor estimate only)."""
    cpu_step = mode.offload or mode.device == "cpu"
    with meter.on_host(mode.offload):
        for p in train:
            p.grad = torch.zeros_like(p)
            meter.register(p.grad, "host" if mode.offload else "device")
    with meter.phase("optimizer"), meter.on_host(mode.offload):
        torch.nn.utils.clip_grad_norm_(train, 1.0, foreach=not cpu_step)
        if mode.optim == "adamw":
            optimizer = torch.optim.AdamW(train, lr=1e-6, weight_decay=0.1, foreach=not cpu_step)
            optimizer.step()
        else:
            optimizer = _lowbit_step(train, meter, mode.optim)
    d = policy.model.config.hidden_size
    with meter.phase("prepass"):
        _prepass(policy, meter, shape, inputs, d, mode.compute_dtype, mode)
    # A later micro-batch of the mini-batch: the earlier ones' gradients are alive (the first
    # micro-batch starts from none: zero_grad(set_to_none=True)).
    if shape.micro_batches_per_update(mode.world_size) == 1:
        for p in train:
            p.grad = None
    with meter.phase("update"):
        _update(policy, inputs, fsdp)


def _load(tracker: MemoryTracker, dims: dict, shape: StepShape, mode: Mode) -> dict[str, int]:
    """The load phase: the model built in fp32 on the CPU as `resrl.loading.load_model` builds it
    from a config (run on fake tensors, measured), then moved to the GPU (no offload), then
    sharded unit after unit (FSDP2 copies a unit's parameters into their padded shards, then frees
    the whole ones; counted). With a reference model, its build at the first step: a second
    whole model (fp32 on the host; in the compute dtype once moved to the GPU) beside the
    policy's master shards, before any AdamW state."""
    gpu = mode.device == "cuda"
    # A LoRA base is loaded in the compute dtype, its fp32 adapters injected in place (`resrl.lora`).
    dtype = mode.compute_dtype if mode.lora else torch.float32
    with tracker.phase("load"), tracker.on_host(gpu):
        net = _qwen3(dims, dtype, shape)
        built = tracker.peak["host" if gpu else "device"]
        if mode.lora:
            _inject_lora(net, mode.lora_rank, dtype, fake=True)
    out = dict(tracker.peaks["load"])
    params = list(net.parameters())
    whole = sum(tracker.bytes_of(p.element_size() * p.numel()) for p in params)
    adapters = _adapter_ids(net)
    base = [p for p in params if id(p) not in adapters]
    if not mode.sharded:
        if gpu:
            out["device"] = whole
        if mode.kl_reference:
            # The plain module's frozen copy (a LoRA run's: its base), built beside it.
            out["device"] = max(out["device"], whole + built)
        return out
    where = "host" if mode.offload and gpu else "device"
    layers = [list(layer.parameters()) for layer in net.model.layers]
    in_layers = {id(p) for u in layers for p in u}
    live = peak = whole
    for unit in [*layers, [p for p in params if id(p) not in in_layers]]:
        shards = sum(
            tracker.bytes_of(p.element_size() * math.prod(_shard_shape(p, mode.world_size))) for p in unit
        )
        peak = max(peak, live + shards)
        live += shards - sum(tracker.bytes_of(p.element_size() * p.numel()) for p in unit)
    out[where] = max(out[where], peak)
    if mode.kl_reference:
        if where == "device":
            compute = sum(tracker.bytes_of(mode.compute_dtype.itemsize * p.numel()) for p in base)
            out["device"] = max(out["device"], live + compute + compute // mode.world_size)
        else:
            out[where] = max(out[where], live + built)
    return out


def _dims(model: str | dict) -> dict:
    if isinstance(model, dict):
        return model
    if model not in _bench_step().MODELS:
        raise InputError(f"unknown model {model!r}; accepted: {', '.join(model_names())}")
    return _bench_step().MODELS[model]


def estimate(
    model: str | dict, shape: StepShape, *, path: str = "resrl", mode: Mode | None = None
) -> Estimate:
    """Peak device and host bytes per phase of one step on one rank, from fake tensors. `model`:
    a name of bench_step's MODELS or such a dict of dimensions; `mode`: how the trainer holds it
    (default: bf16 on one GPU)."""
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}; accepted: {', '.join(PATHS)}")
    from resrl.distributed import Policy

    mode = mode or Mode()
    dims = _dims(model)
    gpu = mode.device == "cuda"
    inputs = micro_batch(shape, dims["vocab"])
    with _kernel_impl("triton" if gpu else "torch"), FakeTensorMode(allow_non_fake_inputs=True):
        net = _qwen3(dims, mode.compute_dtype, shape)
        if mode.lora:
            _inject_lora(net, mode.lora_rank, mode.compute_dtype, fake=True)
            if mode.sharded:
                # The parameters stand for FSDP2's compute copies: the adapters' too (their fp32
                # masters are `_Fsdp`'s shards).
                for p in net.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(mode.compute_dtype)
        policy = Policy(net, forward_fn=_bench_step().reference_forward if path == "reference" else None)
        tracker = (
            MemoryTracker(CUDA_BLOCK) if gpu else MemoryTracker(1, {**_ATEN_WORKSPACE, **_CPU_WORKSPACE})
        )
        with tracker:
            if mode.sharded:
                fsdp = _Fsdp(policy, tracker, mode)
                train = fsdp.train
            else:
                fsdp, train = None, [p for p in policy.parameters() if p.requires_grad]
                for t in [*policy.parameters(), *policy.buffers()]:
                    tracker.register(t)
                if mode.kl_reference:
                    adapters = _adapter_ids(policy)
                    ref = [p for p in policy.parameters() if id(p) not in adapters]
                    tracker.hold("reference", sum(tracker.bytes_of(4 * p.numel()) for p in ref))
            run_phases(policy, tracker, shape, inputs, mode, train=train, fsdp=fsdp)
        loader = MemoryTracker(tracker.round_to)
        with loader:
            tracker.peaks["load"] = _load(loader, dims, shape, mode)
    peaks = tracker.peaks
    return Estimate(
        model if isinstance(model, str) else "custom",
        path,
        mode,
        sum(p.numel() for p in policy.parameters() if p.requires_grad),
        sum(p.numel() for p in policy.parameters() if not p.requires_grad),
        device={k: peaks[k]["device"] for k in PHASES},
        host={k: peaks[k]["host"] for k in PHASES},
        optimizer_state=sum(state_bytes(mode.optim, p.numel()) for p in train),
    )


@contextlib.contextmanager
def _process_group(world_size: int) -> Iterator[None]:
    """A one-process gloo group (in-memory store), as the trainer makes for FSDP2 in one process;
    for `world_size` > 1, rank 0 of torch's fake process group (collectives that move no data):
    every allocation of that rank is real, the values are not."""
    import torch.distributed as dist

    if dist.is_initialized():
        if world_size == 1 and dist.get_world_size() == 1:
            yield
            return
        raise RuntimeError(
            f"measure_cpu(world_size={world_size}) makes its own process group, but one of "
            f"{dist.get_world_size()} processes is already initialized"
        )
    if world_size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fully_shard(policy, bf16: bool) -> None:
    """FSDP2 as the trainer applies it: each decoder block, then the root; bf16 compute with fp32
    reduction when `bf16`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = (
        {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        if bf16
        else {}
    )
    for layer in policy.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(policy, **kwargs)


def measure_cpu(
    model: str | dict,
    shape: StepShape,
    *,
    path: str = "resrl",
    dtype: str = "float32",
    world_size: int = 1,
    lora_rank: int = 0,
) -> dict[str, int]:
    """The same phases on real tensors on the CPU, no offload, in the trainer's mode for `dtype`
    and `world_size` (fp32 in one process: the plain module; else FSDP2, bf16 compute with fp32
    masters for bf16, on a one-process gloo group, or as rank 0 of a fake group of `world_size`),
    `lora_rank` > 0: LoRA adapters on a frozen base built in the compute dtype (`resrl.lora.apply`):
    the peak per phase of the CPU allocator's running total of live bytes, read from the
    profiler's allocation events (every allocation of the process, inside the kernels' ops and
    FSDP2 too; the model is built inside the profiled region, so the total starts from it)."""
    from torch._C._profiler import _EventType

    from resrl.distributed import Policy

    mode = Mode(dtype=dtype, world_size=world_size, device="cpu", lora_rank=lora_rank)
    dims = _dims(model)
    inputs = micro_batch(shape, dims["vocab"])
    meter = _Allocator()
    # FSDP2's state holds reference cycles: an earlier measurement's model must be gone first.
    gc.collect()
    with (
        _kernel_impl("torch"),
        _process_group(world_size) if mode.sharded else contextlib.nullcontext(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        with meter.phase("load"):
            net = _qwen3(dims, mode.compute_dtype if mode.lora else torch.float32, shape)
            if mode.lora:
                _inject_lora(net, lora_rank, mode.compute_dtype, fake=False)
            policy = Policy(net, forward_fn=_bench_step().reference_forward if path == "reference" else None)
            if mode.sharded:
                _fully_shard(policy, mode.dtype == "bfloat16")
        train = [p for p in policy.parameters() if p.requires_grad]
        run_phases(policy, meter, shape, inputs, mode, train=train)
        del policy, net, train
        gc.collect()
    allocations, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocations.append((e.start_time_ns, e.extra_fields.total_allocated))
        elif e.name.startswith("estimate:"):
            ranges[e.name.removeprefix("estimate:")] = (e.start_time_ns, e.end_time_ns)
        stack.extend(e.children)
    allocations.sort()
    peaks = {}
    for name, (start, end) in ranges.items():
        # The total when the phase starts (the last event before it), then every event inside it.
        before = [total for t, total in allocations if t < start][-1:]
        inside = [total for t, total in allocations if start <= t <= end]
        peaks[name] = max(before + inside)
    return peaks


# --------------------------------------------------------------------------- the command


def table(rows: list[Estimate], capacities: list[float], reserve_gib: float) -> str:
    """GiB per rank: the device's peak per phase, the device and host peaks, and whether the device
    peak fits each capacity less the reserve."""
    caps = [f"{c:g} GiB ({c - reserve_gib:g} usable)" for c in capacities]
    lines = [
        f"{'path':<10} {'load':>6} {'prepass':>8} {'update':>8} {'optimizer':>9} {'device':>7} {'host':>7}  "
        + "  ".join(f"fits {c}" for c in caps)
    ]
    for r in rows:
        gib = {k: v / GIB for k, v in r.device.items()}
        fits = "  ".join(
            f"{'yes' if r.fits(c, reserve_gib) else 'no':<{len(cap) + 5}}"
            for c, cap in zip(capacities, caps, strict=True)
        )
        lines.append(
            f"{r.path:<10} {gib['load']:>6.1f} {gib['prepass']:>8.1f} {gib['update']:>8.1f} {gib['optimizer']:>9.1f} "
            f"{r.device_peak / GIB:>7.1f} {r.host_peak / GIB:>7.1f}  {fits}".rstrip()
        )
    return "\n".join(lines)


def _number(x: float) -> int | float:
    """An integral float as an int (the JSON's 16, not 16.0)."""
    return int(x) if float(x).is_integer() else x


def _report(
    name: str, rows: list[Estimate], shape: StepShape, capacities: list[float], reserve: float
) -> dict:
    top = next((r for r in rows if r.path == "resrl"), rows[0])
    m = top.mode
    return {
        "model": name,
        "params": top.params,
        "frozen_params": top.frozen,
        "mode": {
            "dtype": m.dtype,
            "world_size": m.world_size,
            "offload": m.offload,
            "kl_reference": m.kl_reference,
            "lora_rank": m.lora_rank,
            "sharding": "fsdp2" if m.sharded else "none",
            "state_bytes_per_param": _number(m.state_bytes_per_param),
        },
        "optimizer": {
            "name": m.optim,
            "class": OPTIMIZERS[m.optim].label,
            "state_bytes": top.optimizer_state,
            "state_bytes_per_param": _number(m.optim_state_bytes_per_param),
            "where": "host" if m.offload else "device",
        },
        "batch": asdict(shape),
        "capacity_gib": capacities,
        "reserve_gib": reserve,
        "path": top.path,
        **top.figures(capacities, reserve),
        "paths": {r.path: r.figures(capacities, reserve) for r in rows},
    }


def main(args) -> int:
    """`resrl estimate`: the paths of each model, as one table per model, or one JSON object."""
    for name in args.model:
        if name not in model_names():
            raise InputError(f"--model {name!r} is unknown; accepted: {', '.join(model_names())}")
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise InputError(f"--paths {args.paths!r}: a comma-separated list of {', '.join(PATHS)}")
    capacities = list(args.gpu_mem)
    if args.reserve >= min(capacities):
        raise InputError(f"--reserve {args.reserve:g} GiB must be below --gpu-mem {min(capacities):g} GiB")
    shape = StepShape(
        prompts=args.prompts,
        n=args.n,
        mini_batch_prompts=args.mini_batch_prompts,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        micro_batch_size=args.micro_batch_size,
        micro_batch_tokens=args.micro_batch_tokens,
        positives=args.positives if args.positives is not None else args.n // 2,
        gradient_checkpointing=not args.no_checkpointing,
    )
    if shape.mini_batch_prompts % args.world_size:
        raise InputError(
            f"--mini-batch-prompts {shape.mini_batch_prompts} must be a multiple of --world-size {args.world_size}"
        )
    mode = Mode(
        dtype=args.dtype,
        world_size=args.world_size,
        offload=args.offload,
        kl_reference=args.kl_reference,
        lora_rank=args.lora_rank,
        # optim.name: `resrl estimate --optim NAME` where the command line has the flag.
        optim=getattr(args, "optim", None) or "adamw",
    )
    reports = []
    for name in args.model:
        if not args.json:
            print(
                f"{name}: {shape.prompts} prompts x {shape.n}, {shape.prompt_len}+{shape.response_len} tokens, "
                f"{shape.seqs_per_micro_batch} sequence{'s' * (shape.seqs_per_micro_batch > 1)} per micro-batch; {mode.describe()}; "
                "estimated with fake tensors",
                flush=True,
            )
        rows = [estimate(name, shape, path=p, mode=mode) for p in paths]
        reports.append(_report(name, rows, shape, capacities, args.reserve))
        if not args.json:
            trained = f"{rows[0].params / 1e9:.2f} B trained parameters"
            if mode.lora:
                trained = (
                    f"{rows[0].params / 1e6:.1f} M trained parameters (the adapters) "
                    f"on a {rows[0].frozen / 1e9:.2f} B frozen base"
                )
            where = "the host" if mode.offload else "the GPU" if mode.device == "cuda" else "the CPU"
            print(
                f"optimizer {mode.optim} ({OPTIMIZERS[mode.optim].label}): "
                f"{rows[0].optimizer_state / GIB:.2f} GiB of state per rank on {where}"
            )
            print(f"{trained}; GiB per rank, device per phase, then peaks")
            print(table(rows, capacities, args.reserve), flush=True)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"models": reports}))
    return 0
