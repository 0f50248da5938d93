"""The RL loop, one phase per call, in the order data flows (ARCHITECTURE.md):

rollout -> reward -> advantages -> pre-pass (old log-probs, ResRL weights) -> update -> weight sync,
with evaluation before and after (and every `eval.every` steps) and checkpoints with resume.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from resrl import checkpoint, lora, rundir
from resrl.algorithms import group_seed
from resrl.batch import RolloutBatch
from resrl.config import Config
from resrl.distributed import (
    Policy,
    all_gather_objects,
    frozen_copy,
    full_parameters,
    init_single_group,
    init_world,
    shard,
)
from resrl.guards import check_finite, out_of_memory_as_one_line, stop_if_not_finite
from resrl.loading import PromptSampler, compute_dtype, load_model, load_task, resolve_device
from resrl.objectives import after_prepass, needs_old_logprobs, uses_reference
from resrl.optim import build_optimizer
from resrl.prepass import prepass
from resrl.r2po import R2PO
from resrl.ranks import check_world, gather_rollouts, mean_over_ranks, rank_share
from resrl.rewards import get_batch_reward, score_responses
from resrl.rollout import SamplingParams, build_engine, free_cached_memory
from resrl.rollout_head import RolloutHead
from resrl.run_state import RunState
from resrl.sft import WarmStart, solution_ids
from resrl.tracker import PhaseClock, Tracker
from resrl.update import Stage, optimizer_step
from resrl.weights import InlineWeights, WeightStats, plan_weights

# Seed streams: each use of randomness draws from its own seed, derived from the run seed, so that
# resuming (or evaluating more often) never changes what a later step samples.
_ROLLOUT, _EVAL, _RESRL, _SHUFFLE, _SFT, _HEAD = 1, 2, 3, 4, 5, 6


def _eval_label(tag: str) -> str:
    """How an evaluation's progress lines name it: tags before, after and stepN."""
    if tag in ("before", "after"):
        return f"evaluation {tag} RL"
    return f"evaluation at step {tag.removeprefix('step')}"


def _seed(seed: int, stream: int, index: int = 0) -> int:
    return group_seed(group_seed(seed, stream), index) & 0x7FFFFFFF


class Trainer(RunState):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.world = init_world(cfg.run.device)
        check_world(cfg, self.world)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self._hold_run_dir()
        # Decided before the model is built, so a refused resume fails in a second.
        resume_from, self.config_changes = checkpoint.resume_point(self.run_dir, cfg, self.world)
        self.device = resolve_device(cfg.run.device, self.world.local_rank)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer, self.train_set, self.eval_set = load_task(cfg)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        # The policy is built in fp32: those are the weights AdamW steps (master weights). With
        # 16-bit compute (model.dtype bfloat16, or auto on CUDA) forwards run on bf16 copies that
        # FSDP2 gathers per unit, and gradients are reduced in fp32; stepping bf16 weights directly
        # would round most updates away (lr 1e-6 against bf16's 2^-8 relative spacing). So FSDP2
        # runs whenever compute is 16-bit, in one process too (a one-process group), as it does
        # with several processes and for CPU offload.
        self.compute_dtype = compute_dtype(cfg.model.dtype, self.device)
        mixed = self.compute_dtype != torch.float32
        self.sharded = sharded = self.world.distributed or cfg.train.cpu_offload or mixed
        if sharded and not self.world.distributed:
            init_single_group(self.device)
        self._shard_kwargs = {"bf16": mixed, "offload": cfg.train.cpu_offload, "device": self.device}
        # With CPU offload the model is built on the CPU and fully_shard moves only what belongs on
        # the device, so the whole fp32 model never sits on the GPU.
        self._load_device = torch.device("cpu") if cfg.train.cpu_offload else self.device
        # LoRA: the frozen base (the warm-started model or the model as given, written once per
        # run) in the compute dtype, adapters injected before sharding (`resrl.lora`).
        self.lora_base, self._lora_sft = None, {}
        model_cfg = cfg
        if lora.enabled(cfg):
            lora.check(cfg, self.tokenizer)
            self.lora_base, self._lora_sft = lora.base_folder(cfg, self.run_dir)
            model_cfg = lora.on_base(cfg, self.lora_base)
        with out_of_memory_as_one_line("model load"):
            self.model = load_model(
                model_cfg,
                self.tokenizer,
                self._load_device,
                dtype=self.compute_dtype if self.lora_base else torch.float32,
                compute_device=self.device,
            )
            if self.lora_base is not None:
                lora.apply(self.model, cfg, self.compute_dtype)
            head = None
            if cfg.r2po.enabled:
                head = RolloutHead.for_model(self.model, cfg.r2po.head_init_std, _seed(cfg.run.seed, _HEAD))
                head = head.to(self._load_device)
            self.policy = Policy(self.model, rollout_head=head)
            if sharded:
                shard(self.policy, **self._shard_kwargs)
        # The policy's parameters only: R²PO's head has its own optimizer (resrl.r2po).
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = build_optimizer(params, o)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        )
        self.sampler = PromptSampler(
            len(self.train_set.examples),
            cfg.train.prompts_per_step,
            seed=_seed(cfg.run.seed, _SHUFFLE),
            shuffle=cfg.data.shuffle,
        )
        self.reward_fn = get_batch_reward(cfg.algorithm.reward)
        engine_dir = None
        serve_adapter = cfg.rollout.engine == "vllm" and cfg.rollout.lora_serving == "adapter"
        if serve_adapter:
            # vLLM serves the adapter on the frozen base; each sync writes the adapter.
            engine_dir = lora.local_folder(self.lora_base)
        elif cfg.rollout.engine == "vllm":
            # The engine starts from a Hugging Face folder; later weights are streamed in place.
            engine_dir = self.run_dir / "rollout_init"
            self.export(engine_dir)
        self.engine = build_engine(
            cfg.rollout.engine,
            self.model,
            self.tokenizer,
            cfg.rollout,
            model_dir=None if engine_dir is None else str(engine_dir),
            max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
            seed=cfg.run.seed,
            rollout_head=head is not None,
            dtype=self.compute_dtype,
            lora_rank=cfg.model.lora_rank if serve_adapter else 0,
            adapter_dir=str(self.run_dir / "rollout_adapter" / f"rank{self.world.rank}"),
            tokenizer_dir=cfg.data.tokenizer if serve_adapter else None,
        )
        if serve_adapter:
            # The adapter the engine samples until the first update (B = 0: the base itself).
            self.engine.sync_weights(self.model)
        # What a step trains: the policy, or (R²PO) the policy and the rollout head in turn.
        self.policy_stage = Stage.policy(
            self.policy,
            self.optimizer,
            self.scheduler,
            cfg,
            sample_head=head is not None,
            sync=lambda: self.engine.sync_weights(self.model),
        )
        self.r2po = None if head is None else R2PO(cfg, self.policy, self.policy_stage, self.engine)
        if head is not None:
            self.engine.sync_head(head)
        self.ref_policy: Policy | None = None
        self.step = 0
        # The warm start while it is to run (its optimizer is saved in its checkpoints).
        self._warm: WarmStart | None = None
        if cfg.sft.steps > 0 and self.lora_base is None:
            self._warm = WarmStart(
                self.policy,
                self.train_set.prompt_ids,
                solution_ids(self.train_set.examples, self.tokenizer),
                cfg.sft,
                pad_id=self.pad_id,
                seed=_seed(cfg.run.seed, _SFT),
                world=self.world,
                device=self.device,
            )
        self._rl_clock: tuple[float, float] | None = None
        self._stop_signal: int | None = None
        self.history: dict[str, Any] = {}
        self._bar = None
        if resume_from is not None:
            self._load(resume_from)
        self.tracker = None
        if self.world.is_main:
            self.tracker = Tracker(
                self.run_dir,
                tensorboard=cfg.run.tensorboard,
                resume_step=self.step if resume_from is not None else None,
            )
            # The config this run continues with, whatever the checkpoint was saved with.
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.step == 0 and "sft" not in self.history:
            with out_of_memory_as_one_line("warm start"):
                self.history["sft"] = self.warm_start()
        if self.step == 0 and cfg.eval.before and "eval_before" not in self.history:
            self.history["eval_before"] = self.evaluate("before")
            if self._stop_asked():
                self._stop("after the evaluation before RL", save=False)
        # RL time adds up across resumes: each checkpoint records the time up to it.
        self._rl_clock = (self.history.get("rl_seconds", 0.0), time.perf_counter())
        steps = range(self.step, cfg.train.steps)
        if cfg.run.progress and self.world.is_main:
            from tqdm import tqdm

            self._bar = tqdm(steps, desc=cfg.algorithm.objective, initial=self.step, total=cfg.train.steps)
            steps = self._bar
        for step in steps:
            metrics = self.train_step(step)
            self.step = step + 1
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self._phase("eval")
                metrics.update({f"eval/{k}": v for k, v in self.evaluate(f"step{self.step}").items()})
            if self.tracker is not None:
                self.tracker.log(self.step, metrics)
            if self._bar is not None:
                self._bar.set_postfix(
                    reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}"
                )
            saved = cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0
            if saved:
                self._phase("checkpoint")
                self.save()
            if self._stop_asked():
                self._stop(f"after step {self.step} of {cfg.train.steps}", save=not saved)
        if self._bar is not None:
            # The last phase shown is over.
            self._bar.set_description_str(cfg.algorithm.objective)
            self._bar.close()
            self._bar = None
        self.save()
        self._rl_clock = None
        self.export(self.run_dir / "final")
        if self.lora_base is not None:
            lora.export_adapter(self.run_dir / "final_adapter", self.policy, self.lora_base, self.world)
        self.history["eval_after"] = self.evaluate("after")
        summary = self.write_summary()
        if self.tracker is not None:
            self.tracker.close()
        rundir.release(self.run_dir)
        return summary

    def train_step(self, step: int) -> dict[str, float]:
        cfg, world = self.cfg, self.world
        if self._uses_reference and self.ref_policy is None:
            self.ref_policy = self._reference_model()
        stage = self.policy_stage if self.r2po is None else self.r2po.stage(step)
        clock = PhaseClock(self.device, self._phase)
        clock.start("rollout")
        # Every rank draws the same prompts and samples its share; then all ranks see every group.
        slots = self.sampler.next()
        with out_of_memory_as_one_line("rollout", step + 1):
            local = self.rollout(slots[world.rank :: world.size], step)
        batch = gather_rollouts(local, len(slots), cfg.rollout.n, world)
        self.engine.sleep()
        metrics = batch.step_metrics(len(slots))
        if self.r2po is not None:
            metrics.update(self.r2po.metrics(stage, batch, len(slots)))
        seq_adv = stage.sequence_advantages(batch)
        # This rank's whole groups, balanced by tokens within every mini-batch.
        n_prompts = len(slots)
        order = list(range(n_prompts))
        if n_prompts > cfg.train.mini_batch_prompts:
            order = self._permutation(n_prompts, step, epoch=0)
        batch, seq_adv, first_epoch, imbalance = rank_share(
            batch, seq_adv, order, cfg.train.mini_batch_prompts, world
        )
        metrics["batch/rank_token_imbalance"] = imbalance
        n_updates = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts * cfg.train.epochs_per_batch
        clock.start("prepass")
        algo = stage.algo
        need_old = needs_old_logprobs(algo, n_updates)
        seed = _seed(cfg.run.seed, _RESRL, step)
        # ResRL weights of whole groups inside the on-policy update's forward; the rest here.
        stats = WeightStats()
        inline, prepass_groups = plan_weights(
            batch, algo, cfg.train, need_old=need_old, seed=seed, stats=stats
        )
        with stop_if_not_finite("pre-pass", step + 1):
            prepass(
                self.policy,
                batch,
                algo,
                temperature=cfg.rollout.temperature,
                micro_batch_size=cfg.train.micro_batch_size,
                pad_id=self.pad_id,
                max_tokens=cfg.train.max_tokens_per_micro_batch if cfg.train.pack else 0,
                seed=seed,
                need_old=need_old,
                ref_policy=self.ref_policy if uses_reference(algo) and not stage.kl_to_base else None,
                world=world,
                device=self.device,
                groups=prepass_groups,
                stats=stats,
                forward=stage.scoring,
            )
        seq_adv, found = after_prepass(algo, batch, seq_adv, world, keep_old=n_updates > 1)
        metrics.update(found)
        clock.start("update")
        with stop_if_not_finite("update", step + 1):
            metrics.update(self.update(batch, seq_adv, step, first_epoch, inline=inline, stage=stage))
        if algo.objective == "resrl":
            metrics.update(stats.metrics(world))
        check_finite(step + 1, metrics, self.policy, world)
        clock.start("sync")
        with out_of_memory_as_one_line("sync", step + 1):
            self._sync_engine(stage)
        metrics.update(clock.stop(tokens=metrics.pop("_tokens")))
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        return mean_over_ranks(metrics, self.world)

    def _sync_engine(self, stage: Stage) -> None:
        """The engine takes the updated weights. The allocator's cached blocks (the update's
        peak) are returned first, then the engine's weights wake and take the new values, and only
        then does its KV cache come back (with the prefix cache emptied): weights, KV cache and
        the update's leftovers are never on the device at once."""
        free_cached_memory(self.device)
        self.engine.wake_up(("weights",))
        stage.sync()
        self.engine.wake_up(("kv_cache",))

    def _phase(self, name: str) -> None:
        """Show the phase running now on the progress bar."""
        if self._bar is not None:
            self._bar.set_description_str(
                f"{self.cfg.algorithm.objective} {'pre-pass' if name == 'prepass' else name}"
            )

    def _permutation(self, n: int, step: int, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(_seed(self.cfg.run.seed, _SHUFFLE, step * 1000 + epoch + 1))
        return torch.randperm(n, generator=gen).tolist()

    # ------------------------------------------------------------------ phases

    def rollout(self, slots: list[int], step: int) -> RolloutBatch:
        """Sample G responses for each prompt slot of this rank and score them (under R²PO, from
        π_roll in both stages)."""
        cfg = self.cfg
        params = SamplingParams(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            # Each rank draws its own stream (one process: the step's stream).
            seed=_seed(cfg.run.seed, _ROLLOUT, step * self.world.size + self.world.rank),
            rollout_head=self.policy_stage.sample_head,
        )
        prompts = [self.train_set.prompt_ids[i] for i in slots]
        if cfg.rollout.engine == "hf":
            # transformers generates with the policy itself: its shards must be gathered.
            with full_parameters(self.policy):
                samples = self.engine.generate(prompts, params)
        else:
            samples = self.engine.generate(prompts, params)
        examples = [self.train_set.examples[slot] for slot in slots]
        answers = [example.answer for example in examples]
        rewards, positive, classes = score_responses(
            samples, answers, self.reward_fn, cfg.algorithm, rows=examples
        )
        group_ids = [step * cfg.train.prompts_per_step + slot for slot in slots]
        return RolloutBatch.from_samples(samples, rewards, positive, group_ids, reward_class=classes)

    def update(
        self,
        batch: RolloutBatch,
        seq_adv: torch.Tensor,
        step: int,
        first_epoch: list[list[int]] | None = None,
        *,
        inline: InlineWeights | None = None,
        stage: Stage | None = None,
    ) -> dict[str, float]:
        """Optimizer steps over mini-batches of whole prompt groups; micro-batches accumulate.

        `first_epoch`: this rank's groups (positions in `batch`) for each mini-batch of the first
        epoch, as `_plan` balanced them; later epochs (and `None`) shuffle this rank's groups.
        `inline`: ResRL weights formed in the update's forward (one on-policy optimizer step).
        `stage`: what is trained (default: the policy)."""
        stage = stage or self.policy_stage
        cfg = self.cfg
        g = cfg.rollout.n
        n_prompts = len(batch) // g
        mbp = cfg.train.mini_batch_prompts // self.world.size
        totals: dict[str, float] = {}
        n_steps = 0
        for epoch in range(cfg.train.epochs_per_batch):
            if epoch == 0 and first_epoch is not None:
                mini_batches = first_epoch
            else:
                order = list(range(n_prompts))
                if epoch > 0 or n_prompts > mbp:
                    order = self._permutation(n_prompts, step, epoch)
                mini_batches = [order[k : k + mbp] for k in range(0, n_prompts, mbp)]
            for groups in mini_batches:
                idx = [slot * g + j for slot in groups for j in range(g)]
                m = optimizer_step(
                    self.policy,
                    stage,
                    batch,
                    idx,
                    seq_adv,
                    cfg,
                    world=self.world,
                    device=self.device,
                    pad_id=self.pad_id,
                    first=n_steps == 0,
                    # Numbered from 1, as in metrics.jsonl, for its error messages.
                    step=self.step + 1,
                    inline=inline,
                )
                n_steps += 1
                for key, value in m.items():
                    totals[key] = totals.get(key, 0.0) + value
        out = {key: value / n_steps for key, value in totals.items() if key != "rollout/logprob_gap"}
        if "rollout/logprob_gap" in totals:
            out["rollout/logprob_gap"] = totals["rollout/logprob_gap"]
        out["optim/steps"] = float(n_steps)
        return out

    # ------------------------------------------------------------------ around the loop

    def warm_start(self) -> dict[str, float]:
        """The supervised warm start (or what is left of it after a resume), with checkpoints
        every `sft.checkpoint_every` steps and at its end; its optimizer is dropped afterwards."""
        if self._warm is None:
            # Under LoRA the warm start made the base (full fine-tuning, `lora.base_folder`).
            return dict(self._lora_sft)
        metrics = self._warm.run(
            progress=self.cfg.run.progress and self.world.is_main, after_step=self._after_warm_step
        )
        self._warm = None
        self.engine.sync_weights(self.model)
        return metrics

    def evaluate(self, tag: str) -> dict[str, float]:
        from resrl.eval.evaluate import evaluate

        cfg = self.cfg
        examples = self.eval_set.examples
        if cfg.eval.max_problems:
            examples = examples[: cfg.eval.max_problems]
        world = self.world
        # Each rank samples its share of the problems (chunks of at most 64, spread over the
        # ranks) and every rank gets the whole result. The hf engine generates with the policy
        # itself, whose shards must be gathered first.
        gathered = full_parameters(self.policy) if cfg.rollout.engine == "hf" else contextlib.nullcontext()
        with gathered, out_of_memory_as_one_line("evaluation"):
            result = evaluate(
                self.engine,
                examples,
                self.tokenizer,
                n=cfg.eval.n,
                temperature=cfg.eval.temperature,
                top_p=cfg.eval.top_p,
                max_new_tokens=cfg.rollout.max_new_tokens,
                seed=_seed(cfg.run.seed, _EVAL),
                reward=cfg.algorithm.reward,
                batch_prompts=min(64, -(-len(examples) // world.size)),
                progress=cfg.run.progress and world.is_main and _eval_label(tag),
                part=(world.rank, world.size),
                gather=lambda done: all_gather_objects(done, world),
            )
        if world.is_main:
            result.write(self.run_dir / "eval", name=tag)
        return result.summary

    @property
    def _uses_reference(self) -> bool:
        """A frozen copy of the starting policy is kept for the KL terms and for ACE."""
        r = self.cfg.r2po
        head_kl = r.enabled and r.head_kl_coef > 0 and r.head_kl_target == "reference"
        return uses_reference(self.cfg.algorithm) or head_kl

    def _reference_model(self) -> Policy:
        """A frozen copy of the policy as RL starts (after any warm start), for the KL term: the
        same architecture, sharded like the policy under FSDP2, saved in checkpoints beside it."""
        # Never stepped: held in the compute dtype, no master copy. Under LoRA the policy starts as
        # its base (B = 0), so the reference is the base itself, loaded rather than copied.
        cfg = self.cfg if self.lora_base is None else lora.on_base(self.cfg, self.lora_base)
        model = load_model(
            cfg, self.tokenizer, self._load_device, dtype=self.compute_dtype, compute_device=self.device
        )
        source = None if self.lora_base is not None else self.policy
        return frozen_copy(source, Policy(model), self._shard_kwargs if self.sharded else None)
