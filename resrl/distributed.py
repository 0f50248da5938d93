"""Data parallelism with FSDP2 across processes started by torchrun (NCCL on GPUs, gloo on CPU).

`fully_shard` wraps every decoder block and then the `Policy` root, whose forward is the trainer's
whole forward (trunk + fused LM head): the root's parameters (embeddings, final norm, LM head,
tied or not) are unsharded for the duration of that forward, so `linear_logprob` sees the full
LM-head weight and its gradient reaches the shard through autograd. Every rank holds complete
prompt groups (a rank's prompts with all their responses), so ResRL weights are computed per rank
without communication; only counts, metrics and gradients are reduced.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()
# NCCL for GPU tensors, gloo for CPU ones: with CPU offload the sharded parameters, gradients (for
# the norm in gradient clipping) and the weights streamed to vLLM are CPU DTensors.
_BACKEND_CUDA = "cpu:gloo,cuda:nccl"


def init_world(device_name: str) -> World:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(_BACKEND_CUDA if use_cuda else "gloo")
    return World(rank, size, local_rank)


def init_single_group(device: torch.device) -> None:
    """A one-process group (in-memory store), for FSDP2 in a single process (CPU offload)."""
    if not dist.is_initialized():
        backend = _BACKEND_CUDA if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shutdown(world: World) -> None:
    """Leave the process group. torch 2.13 + gloo can abort at interpreter exit after a backward
    ("terminate called without an active exception"), so a distributed worker ends with
    os._exit(0) once everything is flushed (ARCHITECTURE.md, seen on this project's machines)."""
    if not world.distributed or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Policy(nn.Module):
    """The trainer-owned forward (`resrl.model.forward_logprobs`) as a module: the FSDP2 root.

    `forward_fn` replaces that forward (same signature and outputs); benchmarks use it to run
    another path (full logits) through the same sharded module. `rollout_head` (R²PO's
    `resrl.rollout_head.RolloutHead`) is a sibling of the Hugging Face model, never inside it:
    `policy.model`'s parameters (the policy optimizer, `save_pretrained`, the engines' weight
    streaming) never see it; checkpoints of the Policy do. `forward(..., rollout_head=True)`
    scores with π_roll."""

    def __init__(self, model: nn.Module, forward_fn=None, rollout_head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn
        self.rollout_head = rollout_head

    def forward(self, input_ids, attention_mask, *, rollout_head: bool = False, **kwargs):
        from resrl.model import forward_logprobs

        if rollout_head:
            if self.rollout_head is None:
                raise RuntimeError("Policy.forward(rollout_head=True) on a policy without a rollout head")
            kwargs["rollout_head"] = self.rollout_head
        return (self.forward_fn or forward_logprobs)(self.model, input_ids, attention_mask, **kwargs)


def shard(policy: Policy, *, bf16: bool, offload: bool, device: torch.device) -> Policy:
    """FSDP2: `fully_shard` per decoder block, then the root. bf16 compute with fp32 gradient
    reduction when `bf16` (the sharded parameters, what AdamW steps, keep the dtype the model was
    built in: fp32 master weights); parameters and optimizer state on CPU when `offload`. `device`
    is where forwards run; the root is initialized there (`_init_root`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        # Pinned host memory needs an accelerator; unpinned keeps the path runnable (and tested) on CPU.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    # The root returns views (logprob reshaped to [B, L-1]); nothing modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in policy.model.model.layers:
        fully_shard(layer, **kwargs)
    if policy.rollout_head is not None:
        # Its own unit: gathered only when its forward runs, so stage B never all-gathers W2. No
        # mixed-precision policy: its sharded weights and gradient reduction stay fp32 (steps of ~lr
        # on weights that start at 1e-6); its forward casts to the compute dtype.
        fully_shard(policy.rollout_head, **{k: v for k, v in kwargs.items() if k != "mp_policy"})
    fully_shard(policy, **kwargs)
    _init_root(policy, device)
    return policy


def _init_root(policy: Policy, device: torch.device) -> None:
    """One forward of two tokens through the root, without gradients, then reshard.

    FSDP2 makes the first unit whose forward runs the root of the tree. The hf engine generates
    through `policy.model` (the decoder blocks' units run, the Policy root does not), and so does
    nothing else until the first training forward: a run with no warm start (or a resumed one)
    would make each decoder block its own root and then fail at the update ("FSDP state has
    already been lazily initialized for model.model.layers.0"). Running the root first, here,
    fixes the tree whatever runs next. Every rank calls it (it all-gathers)."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        policy(ids, torch.ones_like(ids))
    policy.reshard()


def frozen_copy(policy: Policy | None, copy: Policy, shard_kwargs: dict | None) -> Policy:
    """`copy` (a Policy around a freshly built model of the same architecture) made a frozen copy
    of `policy`'s causal LM: sharded like it when `shard_kwargs` are given (each rank its share),
    no gradients, eval mode; R²PO's rollout head is not part of it. `policy` None: `copy` keeps
    the weights it was built with (a LoRA run's reference is its base)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if shard_kwargs is not None:
        shard(copy, **shard_kwargs)
    copy.requires_grad_(False).eval()
    if policy is not None:
        own = {k: v for k, v in get_model_state_dict(policy).items() if k.startswith("model.")}
        set_model_state_dict(copy, own)
    return copy


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(policy: nn.Module) -> Iterator[None]:
    """Every parameter unsharded for generation or export, and kept so: ranks generate different
    numbers of tokens, so no collective may run per decoding step. A no-op without FSDP."""
    modules = _fsdp_modules(policy)
    if not modules:
        yield
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, world: World) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def common_count(n: int, world: World, device: torch.device) -> int:
    """The largest `n` over ranks: every rank runs that many forwards so FSDP's collectives pair up."""
    if not world.distributed:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def idle_forward(policy: nn.Module, pad_id: int, device: torch.device, **forward: Any) -> dict:
    """A forward on two padding tokens: the turn of a rank that has run out of micro-batches
    (`forward`: the other ranks' forward options, e.g. rollout_head=True, so the same units gather)."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return policy(ids, torch.ones_like(ids), return_entropy=True, **forward)
