"""Peak device memory of one ResRL step at real shapes, estimated on the CPU with fake tensors.

`resrl estimate --model qwen3-4b` runs the phases of a training step on a Qwen3-shaped model whose
tensors have shapes but no data (`FakeTensorMode`), through the project's own forward
(`resrl.distributed.Policy` over `forward_logprobs`, or bench/bench_step.py's `reference_forward`
for the reference recipe's path: full fp32 logits and every layer's hidden states), and counts
the bytes of live tensors with a dispatch-level tracker (`MemoryTracker`). The trainer's step
itself is not pushed through: it reads metrics back to the host (`.item()`, `.tolist()`), which
tensors without data cannot do. The phases, as `Trainer.train_step` runs them in a steady state
(step 2 on: gradients and AdamW state from the previous step are still alive):

- pre-pass: one micro-batch forward under no_grad with the subspace hidden state captured, while
  the positive pool of every mixed group is held (the pre-pass visits positives first and keeps
  their captured hidden states until the first negative), then one group's basis;
- update: the forward and backward of one micro-batch (the LM head on response rows only, the
  loss formed inside the pass), with the gradients of earlier micro-batches alive;
- optimizer: gradient clipping and the AdamW step (its state created on the first step).

Workspaces inside the kernels' custom ops are invisible to a tracker above `FakeTensorMode` (a
fake implementation allocates only the outputs), so the tracker runs each op's own Python body
on the fake inputs instead, with the Triton launches replaced by no-ops: every host allocation of
the real op (the forward's split partials, the backward's dz [N, VC] chunk and fp32 [N, D]
accumulator, the chunked path's [C, V] logits) is counted. `subspace_basis` has a data-dependent
rank; a shape-only stand-in allocates what it does with k = min(rank, M' - 1, D).

What the estimate leaves out: the CUDA context, cuBLAS and attention-kernel workspaces, and the
caching allocator's fragmentation (`--reserve` GiB stands for them in "fits"); the rollout
engine (vLLM sleeps during these phases). Sequences are taken at full prompt + response length,
the worst case for a peak. CPU offload (`--offload`, FSDP2 with parameters, gradients and AdamW
state on the host) is modelled rather than run: the root module's parameters (embeddings, final
norm, LM head) are unsharded on the device for the whole forward and backward with their
gradients (bf16, then an fp32 reduce copy), and a fixed working set of decoder layers is on the
device at a time (two layers' bf16 parameters, one layer's bf16 gradients and their fp32 reduce
copy); the optimizer step runs on the host.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resrl.errors import InputError

# The modules (the package's names `kernels.linear_logprob` is the function of that name).
_LL = importlib.import_module("kernels.linear_logprob")
_FL = importlib.import_module("kernels.fused_loss")

GIB = 2**30
PHASES = ("prepass", "update", "optimizer")
PATHS = ("resrl", "reference")
# What the CUDA caching allocator rounds every block up to.
CUDA_BLOCK = 512
# Streaming multiprocessors of an H100/H200 (SXM): how many vocabulary splits the forward kernel uses.
HOPPER_SMS = 132


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
    """Prompts per step (train.prompts_per_step)."""
    n: int = 4
    """Responses per prompt (rollout.n)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step (train.mini_batch_prompts)."""
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

    @property
    def micro_batches_per_update(self) -> int:
        return math.ceil(self.mini_batch_prompts * self.n / self.seqs_per_micro_batch)


@dataclass
class Estimate:
    model: str
    path: str
    offload: bool
    peaks: dict[str, int] = field(default_factory=dict)
    """Peak live device bytes per phase."""

    @property
    def peak(self) -> int:
        return max(self.peaks.values())


# --------------------------------------------------------------------------- the tracker


class MemoryTracker(TorchDispatchMode):
    """Live bytes of tensor storages created by ops (and of tensors registered), and their peak.

    A storage counts from the op that creates it until its last reference dies (a weakref
    finalizer on the storage). Registered storages with `count=False` (offloaded parameters) are
    known but cost nothing. The kernels' custom ops run their own Python body here (see the
    module docstring), so their workspaces count. Scalars read back to the host (value checks,
    range checks) read as 1 or False: no allocation depends on them.
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to = round_to
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self.extra = 0
        self.peaks: dict[str, int] = {}
        """Peak bytes of each finished `phase`."""

    def bytes_of(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to if nbytes else 0

    def register(self, t: torch.Tensor, count: bool = True) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._refs:
            return
        n = self.bytes_of(st.nbytes()) if count else 0

        def release(_ref, key=key, n=n):
            self._refs.pop(key, None)
            self.live -= n

        self._refs[key] = weakref.ref(st, release)
        self.live += n
        self.mark()

    def mark(self) -> None:
        self.peak = max(self.peak, self.live + self.extra)

    def reset_peak(self) -> None:
        self.peak = self.live + self.extra

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.reset_peak()
        yield
        self.peaks[name] = self.peak

    @contextlib.contextmanager
    def resident(self, nbytes: int) -> Iterator[None]:
        """`nbytes` more on the device for the duration (a modelled working set)."""
        self.extra += nbytes
        self.mark()
        try:
            yield
        finally:
            self.extra -= nbytes

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
                self.register(t)
        workspace = _ATEN_WORKSPACE.get(func)
        if workspace is not None:
            self.peak = max(self.peak, self.live + self.extra + self.bytes_of(workspace(*args)))
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


def _policy_inputs(t: dict[str, torch.Tensor]) -> tuple:
    return (t["input_ids"], t.get("attention_mask"))


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


def _prepass(policy, meter, shape: StepShape, t: dict, d: int, dtype: torch.dtype, need_old: bool):
    """The pre-pass at its fullest: every positive micro-batch's captured hidden states held, then
    the micro-batch that reaches the first negative, then one group's basis."""
    s = shape.seqs_per_micro_batch
    positives = shape.prompts * shape.positives if 0 < shape.positives < shape.n else 0
    pools = [torch.empty(s * shape.response_len, d, dtype=dtype) for _ in range(positives // s)]
    for p in pools:
        meter.register(p)
    with torch.no_grad():
        out = policy(
            *_policy_inputs(t),
            position_ids=t.get("position_ids"),
            positions=t["positions"],
            subspace_layer="penultimate" if positives else None,
            logprobs=need_old,
        )
        if positives:
            group_pool = torch.cat([out["sub_hidden"][: shape.response_len]] * shape.positives)
            basis = _basis_standin(group_pool, shape.subspace_rank, shape.subspace_max_tokens)
            del group_pool, basis
    del pools, out


def _update(policy, t: dict) -> None:
    """One micro-batch forward and backward through the loss formed inside the LM-head pass."""
    from resrl.algorithms import PolicyTokenLoss

    m = t["positions"].shape[0]
    token_loss = PolicyTokenLoss(torch.ones(m), torch.full((m,), 1.0 / m), sample_logprob=torch.zeros(m))
    policy.train()
    out = policy(
        *_policy_inputs(t),
        position_ids=t.get("position_ids"),
        positions=t["positions"],
        return_entropy=True,
        token_loss=token_loss,
    )
    out["loss"].backward()
    del out


def _optimizer(policy, optimizer: torch.optim.Optimizer) -> None:
    params = [p for p in policy.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=optimizer.defaults.get("foreach"))
    optimizer.step()


def _layer_bytes(model, dtype: torch.dtype) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() for p in layer.parameters()) * torch.tensor([], dtype=dtype).element_size()


class _Allocator:
    """The meter of a real run: phases as profiler ranges; `measure_cpu` reads the CPU allocator's
    running total inside them. Registration and modelled residency are the tracker's business."""

    def register(self, t: torch.Tensor, count: bool = True) -> None:
        pass

    def resident(self, nbytes: int):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"estimate:{name}"):
            yield


def run_phases(
    model, policy, meter, shape: StepShape, inputs: dict[str, torch.Tensor], *, foreach: bool, offload: bool
) -> None:
    """The three phases on `policy` (fake or real tensors) in a steady state, each inside
    `meter.phase(name)`: the optimizer step first (it creates the AdamW state every later phase
    lives with), then the pre-pass, then one update micro-batch."""
    params = [p for p in policy.parameters() if p.requires_grad]
    dtype = params[0].dtype
    d = model.config.hidden_size
    need_old = shape.prompts > shape.mini_batch_prompts
    layers = {id(p) for p in model.model.layers.parameters()}
    if offload:
        # Root parameters stay unsharded on the device through the step; layers' come and go.
        for p in policy.parameters():
            meter.register(p, count=id(p) not in layers)
        for p in model.model.layers.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        layer = _layer_bytes(model, dtype)
        with meter.phase("optimizer"):
            pass
        with meter.phase("prepass"), meter.resident(2 * layer):
            _prepass(policy, meter, shape, inputs, d, dtype, need_old)
        # Two layers' parameters, one layer's gradients in bf16 and their fp32 reduce copy.
        with meter.phase("update"), meter.resident(2 * layer + 3 * layer):
            _update(policy, inputs)
            # The root's gradients are reduced in fp32 at the end of the backward, then offloaded.
            root_grads = [p.grad.float() for p in policy.parameters() if p.grad is not None]
            del root_grads
        return

    for p in policy.parameters():
        meter.register(p)
    # Steady state: the gradients and AdamW state of the previous step exist. The first
    # optimizer step creates the state; its peak is that of every later step.
    for p in params:
        p.grad = torch.zeros_like(p)
        meter.register(p.grad)
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1, foreach=foreach)
    with meter.phase("optimizer"):
        _optimizer(policy, optimizer)
    with meter.phase("prepass"):
        _prepass(policy, meter, shape, inputs, d, dtype, need_old)
    # A later micro-batch of the mini-batch: the earlier ones' gradients are alive (the first
    # micro-batch starts from none: zero_grad(set_to_none=True)).
    if shape.micro_batches_per_update == 1:
        for p in params:
            p.grad = None
    with meter.phase("update"):
        _update(policy, inputs)


def _dims(model: str | dict) -> dict:
    if isinstance(model, dict):
        return model
    if model not in _bench_step().MODELS:
        raise InputError(f"unknown model {model!r}; accepted: {', '.join(model_names())}")
    return _bench_step().MODELS[model]


def estimate(
    model: str | dict,
    shape: StepShape,
    *,
    path: str = "resrl",
    offload: bool = False,
    target: str = "gpu",
) -> Estimate:
    """Peak device bytes per phase of one step, from fake tensors. `model`: a name of
    bench_step's MODELS or such a dict of dimensions. `target` "gpu": bf16, the Triton kernels'
    host code, foreach AdamW, CUDA's 512-byte blocks; "cpu": fp32, the PyTorch kernels, for-loop
    AdamW, exact bytes (what `measure_cpu` measures on real tensors)."""
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}; accepted: {', '.join(PATHS)}")
    from resrl.distributed import Policy

    dims = _dims(model)
    gpu = target == "gpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    result = Estimate(model if isinstance(model, str) else "custom", path, offload)
    inputs = micro_batch(shape, dims["vocab"])
    with _kernel_impl("triton" if gpu else "torch"), FakeTensorMode(allow_non_fake_inputs=True):
        net = _qwen3(dims, dtype, shape)
        policy = Policy(net, forward_fn=_bench_step().reference_forward if path == "reference" else None)
        tracker = MemoryTracker(CUDA_BLOCK if gpu else 1)
        with tracker:
            run_phases(net, policy, tracker, shape, inputs, foreach=gpu, offload=offload)
    result.peaks = tracker.peaks
    return result


def measure_cpu(model: str | dict, shape: StepShape, *, path: str = "resrl") -> dict[str, int]:
    """The same phases on real fp32 tensors on the CPU, no offload: the peak per phase of the CPU
    allocator's running total of live bytes, read from the profiler's allocation events (every
    allocation of the process, inside the kernels' ops too; the model is built inside the
    profiled region, so the total starts from it)."""
    from torch._C._profiler import _EventType

    from resrl.distributed import Policy

    dims = _dims(model)
    inputs = micro_batch(shape, dims["vocab"])
    with (
        _kernel_impl("torch"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        net = _qwen3(dims, torch.float32, shape)
        policy = Policy(net, forward_fn=_bench_step().reference_forward if path == "reference" else None)
        run_phases(net, policy, _Allocator(), shape, inputs, foreach=False, offload=False)
        del policy, net
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


def table(rows: list[Estimate], gpu_gib: float, reserve_gib: float) -> str:
    budget = gpu_gib - reserve_gib
    lines = [
        f"{'path':<10} {'offload':<8} {'prepass':>9} {'update':>9} {'optimizer':>10} {'peak GiB':>9}  fits {gpu_gib:g} GiB"
    ]
    for r in rows:
        gib = {k: v / GIB for k, v in r.peaks.items()}
        fits = "yes" if r.peak / GIB <= budget else "no"
        lines.append(
            f"{r.path:<10} {'yes' if r.offload else 'no':<8} {gib['prepass']:>9.1f} {gib['update']:>9.1f} "
            f"{gib['optimizer']:>10.1f} {r.peak / GIB:>9.1f}  {fits}"
        )
    return "\n".join(lines)


def main(args) -> int:
    """`resrl estimate`: both paths, as one table (seconds to a minute or two per path)."""
    if args.model not in model_names():
        raise InputError(f"--model {args.model!r} is unknown; accepted: {', '.join(model_names())}")
    if args.reserve >= args.gpu_mem:
        raise InputError(f"--reserve {args.reserve:g} GiB must be below --gpu-mem {args.gpu_mem:g} GiB")
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
    print(
        f"{args.model}: {shape.prompts} prompts x {shape.n}, {shape.prompt_len}+{shape.response_len} tokens, "
        f"{shape.seqs_per_micro_batch} sequences per micro-batch, bf16, "
        f"{'CPU offload' if args.offload else 'one GPU, no offload'}; estimated with fake tensors",
        flush=True,
    )
    rows = [estimate(args.model, shape, path=p, offload=args.offload) for p in PATHS]
    print(table(rows, args.gpu_mem, args.reserve))
    return 0
