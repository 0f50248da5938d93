"""Worker for tests/test_distributed.py, run under torchrun (or alone as one process).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT [--resume CKPT] [overrides]

Builds the trainer on a very small model and runs one whole `train_step` whose rollout is replaced
by fixed responses for the step's prompts (each rank "samples" its share; the trainer gathers them,
balances groups over the ranks by tokens, runs the pre-pass and the optimizer step), records the
gradients, saves a checkpoint and exports the full weights. With --resume, it first restores the
given checkpoint (written at any process count) and then does the same. Rank 0 writes
OUT/result.json and OUT/grads.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from small import SMALL_RUN  # noqa: E402

from resrl import checkpoint  # noqa: E402
from resrl.batch import RolloutBatch  # noqa: E402
from resrl.config import resolve  # noqa: E402
from resrl.distributed import shutdown  # noqa: E402
from resrl.trainer import Trainer  # noqa: E402

SMALL = [
    *SMALL_RUN,
    "data.task_eval_size=4",
    "train.micro_batch_size=3",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "run.device=cpu",
]


def fixed_batch(trainer: Trainer, slots: list[int]) -> RolloutBatch:
    """Deterministic responses for prompt slots 0..3; half of each group positive."""
    prompts, responses, positive, groups = [], [], [], []
    for slot in slots:
        gen = torch.Generator().manual_seed(1000 + slot)
        for j in range(4):
            n = int(torch.randint(3, 10, (1,), generator=gen))
            prompts.append(trainer.train_set.prompt_ids[slot])
            responses.append(torch.randint(4, 40, (n,), generator=gen).tolist())
            positive.append(j % 2 == 0)
            groups.append(slot)
    return RolloutBatch.scored(prompts, responses, positive, groups)


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    resume = None
    if args[:1] == ["--resume"]:
        resume, args = Path(args[1]), args[2:]
    cfg = resolve("tiny", overrides=[*SMALL, f"run.out_dir={out}", "run.name=run", "run.resume=false", *args])
    trainer = Trainer(cfg)
    world = trainer.world
    if resume is not None:
        trainer._load(resume)
    trainer.rollout = lambda slots, step: fixed_batch(trainer, slots)
    grads = {}

    def recording(step):
        def record_then_step():
            # full_tensor() gathers a DTensor shard (collective: every rank calls it).
            for name, p in trainer.policy.named_parameters():
                if p.grad is not None:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[name] = g.detach().clone()
            step()

        return record_then_step

    # The policy's optimizer, and R²PO's head optimizer when there is one.
    for optimizer in trainer._optimizers().values():
        optimizer.step = recording(optimizer.step)
    metrics = trainer.train_step(trainer.step)
    trainer.step = 1 if resume is None else 2
    saved = trainer.save()
    trainer.export(out / "exported")
    if world.is_main:
        torch.save(grads, out / "grads.pt")
        (out / "result.json").write_text(json.dumps({"metrics": metrics, "checkpoint": str(saved)}))
        checkpoint.latest(out / "run")
    shutdown(world)


if __name__ == "__main__":
    main()
