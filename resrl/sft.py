"""Supervised warm start on reference solutions, so the base policy is right sometimes before RL.

The loss is the mean negative log-likelihood of the solution tokens (and the EOS after them)
through the same fused `linear_logprob` path as RL; prompt tokens are not trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from resrl.batch import pad_sequences
from resrl.config import RunError, SFTConfig
from resrl.data import Example
from resrl.distributed import SINGLE, World


def solution_ids(examples: list[Example], tokenizer) -> list[list[int]]:
    """Token ids of each example's solution followed by EOS."""
    missing = [ex.index for ex in examples if not ex.solution]
    if missing:
        raise ValueError(
            f"the supervised warm start (sft.steps > 0) needs a 'solution' for every training row; rows "
            f"{missing[:5]} have none. Add solutions or set sft.steps=0"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the warm start must teach the policy to stop")
    return [list(tokenizer.encode(ex.solution, add_special_tokens=False)) + [eos] for ex in examples]


class WarmStart:
    """`cfg.steps` AdamW steps on random batches of (prompt, solution) pairs (each rank takes its
    share of every batch; FSDP averages the ranks' gradients), resumable: `state_dict()` (steps
    done, the batch generator, losses, seconds) and `optimizer` go into the run's checkpoints
    while the warm start is under way, so a run killed during it continues from its last
    checkpoint instead of from zero."""

    def __init__(
        self,
        policy: nn.Module,
        prompt_ids: list[list[int]],
        target_ids: list[list[int]],
        cfg: SFTConfig,
        *,
        pad_id: int,
        seed: int,
        world: World = SINGLE,
        device: torch.device | None = None,
    ) -> None:
        if cfg.batch_size < world.size:
            raise ValueError(f"sft.batch_size={cfg.batch_size} is smaller than the {world.size} processes")
        self.policy, self.prompt_ids, self.target_ids, self.cfg = policy, prompt_ids, target_ids, cfg
        self.pad_id, self.world = pad_id, world
        # The compute device (CPU-offloaded shards live on the CPU): given, or the parameters'.
        self.device = device or next(policy.parameters()).device
        # The causal LM's own parameters (never R²PO's rollout head, a sibling inside the Policy).
        self.params = [p for p in getattr(policy, "model", policy).parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "generator": self.gen.get_state(),
            "losses": list(self.losses),
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.gen.set_state(state["generator"])
        self.losses = [float(x) for x in state["losses"]]
        self.seconds = float(state["seconds"])

    def run(
        self, *, progress: bool = False, after_step: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """The remaining steps; `after_step(steps_done)` runs after each (checkpoints, a stop asked
        for). Returns loss metrics."""
        cfg = self.cfg
        self.policy.train()
        start = time.perf_counter() - self.seconds
        steps = range(self.step, cfg.steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="warm start", leave=False, initial=self.step, total=cfg.steps)
        for step in steps:
            loss = self._step(step)
            self.losses.append(loss)
            self.step = step + 1
            self.seconds = time.perf_counter() - start
            if progress:
                steps.set_postfix(loss=f"{loss:.3f}")
            if after_step is not None:
                after_step(self.step)
        if not self.losses:
            return {}
        return {
            "sft/loss_first": self.losses[0],
            "sft/loss_last": sum(self.losses[-10:]) / len(self.losses[-10:]),
            "sft/seconds": self.seconds,
        }

    def _step(self, step: int) -> float:
        cfg, world, device = self.cfg, self.world, self.device
        idx = torch.randint(len(self.prompt_ids), (cfg.batch_size,), generator=self.gen).tolist()[
            world.rank :: world.size
        ]
        ids_BL, mask_BL, resp_BT = pad_sequences(
            [self.prompt_ids[i] for i in idx], [self.target_ids[i] for i in idx], self.pad_id
        )
        ids_BL, mask_BL, resp_BT = ids_BL.to(device), mask_BL.to(device), resp_BT.to(device)
        try:
            logprob_BT = self.policy(ids_BL, mask_BL)["logprob"]
        except ValueError as e:
            # The kernels' value checks: the weights produced non-finite hidden states.
            if "NaN or Inf" not in str(e):
                raise
            raise RunError(
                f"the warm start stopped at step {step + 1} of {cfg.steps}: {e}; lower sft.lr"
            ) from e
        loss = -torch.where(resp_BT, logprob_BT, 0.0).sum() / resp_BT.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        # The global norm (the same on every rank), checked before the optimizer step, so a
        # non-finite loss or gradient never reaches the weights.
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise RunError(
                f"the warm start stopped at step {step + 1} of {cfg.steps}: the gradient norm is {norm} "
                f"(loss {float(loss.detach())}); lower sft.lr"
            )
        self.optimizer.step()
        return float(loss.detach())


def warm_start(
    policy: nn.Module,
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    cfg: SFTConfig,
    *,
    pad_id: int,
    seed: int,
    progress: bool = False,
    world: World = SINGLE,
    device: torch.device | None = None,
) -> dict[str, float]:
    """The whole warm start in one call (`WarmStart` without checkpoints). Returns loss metrics."""
    ws = WarmStart(policy, prompt_ids, target_ids, cfg, pad_id=pad_id, seed=seed, world=world, device=device)
    return ws.run(progress=progress)
