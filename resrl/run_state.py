"""What a run keeps and leaves, as a part of `resrl.trainer.Trainer`: its directory held by one
process, checkpoints written and restored (the warm start's too), a stop asked for with Ctrl-C or
SIGTERM, the exports (`final/`, a LoRA run's `final_adapter/`) and `summary.json`.

`RunState` is a mixin: it reads the trainer's attributes (cfg, world, run_dir, policy, optimizer,
scheduler, sampler, engine, history, step, ...) and holds no state of its own.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from resrl import checkpoint, interrupt, rundir
from resrl.config import RunError, model_shapes
from resrl.distributed import all_gather_objects


class RunState:
    def _hold_run_dir(self) -> None:
        """Create the run directory and hold it for this run (`resrl.rundir`): rank 0 takes the
        lock, and every rank stops with the same one line when it cannot be had or written."""
        error = None
        if self.world.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                rundir.hold(self.run_dir)
            except RunError as e:
                error = str(e)
            except OSError as e:
                error = (
                    f"config run.out_dir: cannot create or write the run directory {self.run_dir} "
                    f"({e.strerror or e}); pass a writable folder"
                )
        error = all_gather_objects(error, self.world)[0]
        if error is not None:
            raise RunError(error)

    def _after_warm_step(self, done: int) -> None:
        every, steps = self.cfg.sft.checkpoint_every, self.cfg.sft.steps
        saved = bool(every) and (done % every == 0 or done == steps)
        if saved:
            self.save()
        if self._stop_asked():
            self._stop(f"during the warm start, after its step {done} of {steps}", save=not saved)

    def _stop_asked(self) -> bool:
        """Whether SIGINT or SIGTERM asked this run to stop (`resrl.interrupt`); every rank sees
        the same answer under torchrun."""
        signum = interrupt.asked()
        if self.world.distributed:
            signum = max((s or 0 for s in all_gather_objects(signum, self.world)), default=0) or None
        self._stop_signal = signum
        return signum is not None

    def _stop(self, where: str, *, save: bool) -> NoReturn:
        """End the run where a stop was asked for: a checkpoint of the work done (when `save`),
        then `interrupt.Stopped` with one line saying where it stopped and how to go on."""
        path = self.save() if save else checkpoint.latest(self.run_dir)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.tracker is not None:
            self.tracker.close()
        rundir.release(self.run_dir)
        kept = f"the last checkpoint is {path}" if path is not None else "no checkpoint was written yet"
        raise interrupt.Stopped(
            self._stop_signal,
            f"stopped by {interrupt.name(self._stop_signal)} {where}; {kept}; run the same command "
            "again to resume",
        )

    def save(self) -> Path:
        if self._rl_clock is not None:
            base, since = self._rl_clock
            self.history["rl_seconds"] = base + time.perf_counter() - since
        meta = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": checkpoint.rng_state(),
            "history": self.history,
            "config": self.cfg.to_dict(),
            # What model.path held, so the folder may move (`config.resume_changes`).
            "model_shapes": model_shapes(self.model.config.to_dict()),
            "world_size": self.world.size,
            "has_reference": self.ref_policy is not None,
            "has_rollout_head": self.r2po is not None,
        }
        if self.r2po is not None:
            meta["head_scheduler"] = self.r2po.head_stage.scheduler.state_dict()
        if self._warm is not None and self.step == 0 and "sft" not in self.history:
            # Saved during the warm start: where it is, to go on from there.
            meta["warm_start"] = self._warm.state_dict()
        # Optimizers that have stepped (R²PO mid-round: one may not have yet); a resume restores
        # those and leaves the others fresh, as they are in the uninterrupted run.
        optimizers = {k: o for k, o in self._optimizers().items() if o.state}
        meta["optimizers"] = list(optimizers)
        return checkpoint.save(
            self.run_dir,
            self.step,
            module=self.policy,
            optimizer=list(optimizers.values()),
            meta=meta,
            keep=self.cfg.run.keep_checkpoints,
            world=self.world,
            # Under LoRA: the adapter only (the base is its own folder; the reference is the base).
            frozen=None if self.ref_policy is None or self.lora_base else {"reference": self.ref_policy},
            trainable_only=self.lora_base is not None,
        )

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        heads = {} if self.r2po is None else {"head": self.r2po.head_stage.optimizer}
        warm = {} if self._warm is None else {"sft": self._warm.optimizer}
        return {"policy": self.optimizer, **heads, **warm}

    def _load(self, path: Path) -> None:
        meta = checkpoint.load_meta(path)
        # The KL reference is made when RL starts: a checkpoint of the warm start has none yet.
        reference = self._uses_reference and "warm_start" not in meta
        checkpoint.check_saved_with(meta, path, self.cfg, reference=reference)
        frozen = None
        if reference:
            self.ref_policy = self._reference_model()
            if self.lora_base is None:
                frozen = {"reference": self.ref_policy}
        own = self._optimizers()
        optimizers = [own[k] for k in meta.get("optimizers", ["policy"])]
        state = checkpoint.load(
            path,
            module=self.policy,
            optimizer=optimizers,
            frozen=frozen,
            trainable_only=self.lora_base is not None,
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.history = state["history"]
        self.step = state["step"]
        if "warm_start" in state:
            self._warm.load_state_dict(state["warm_start"])
        elif "sft" in self.history:
            self._warm = None
        o = self.cfg.optim
        checkpoint.apply_optim_config(
            self.optimizer, self.scheduler, o.lr, (o.beta1, o.beta2), o.weight_decay
        )
        self.engine.sync_weights(self.model)
        if self.r2po is not None:
            self.r2po.head_stage.scheduler.load_state_dict(state["head_scheduler"])
            self.engine.sync_head(self.policy.rollout_head)
        if self.world.is_main:
            where = f"step {self.step}"
            if self._warm is not None:
                where = f"the warm start from its step {self._warm.step}"
            print(
                f"resuming {'from ' if self._warm is None else ''}{where} ({path})",
                file=sys.stderr,
                flush=True,
            )
        if self.config_changes:
            checkpoint.record_config_changes(
                self.run_dir, self.history, self.step, path, self.config_changes, write=self.world.is_main
            )

    def close(self) -> None:
        """Let go of the engine and the run directory: a trainer done within a process that goes on
        (the warm start that makes a LoRA run's base)."""
        self.engine.close()
        # The served adapters' folder (rollout.lora_serving=adapter), once every rank's is gone.
        with contextlib.suppress(OSError):
            (self.run_dir / "rollout_adapter").rmdir()
        if self.tracker is not None:
            self.tracker.close()
        rundir.release(self.run_dir)

    def export(self, path: Path) -> None:
        """A Hugging Face folder of the current policy (see `checkpoint.export_hf`)."""
        checkpoint.export_hf(
            path,
            self.policy,
            self.tokenizer,
            sharded=self.sharded,
            world=self.world,
            dtype=self.compute_dtype,
        )

    def write_summary(self) -> dict[str, Any]:
        h = self.history
        summary = {
            "run": self.cfg.run.name,
            "objective": self.cfg.algorithm.objective,
            "steps": self.step,
            "rl_seconds": h.get("rl_seconds"),
            "train_seconds": (h.get("rl_seconds") or 0.0) + h.get("sft", {}).get("sft/seconds", 0.0),
            "sft": h.get("sft", {}),
            "eval_before": h.get("eval_before"),
            "eval_after": h.get("eval_after"),
            "device": str(self.device),
        }
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
