"""One ResRL training step of a Qwen3-shaped model: resrl's path against the reference recipe's path.

Both paths run the trainer's own step (`Trainer.train_step`: pre-pass with streamed ResRL weights,
then the micro-batched update and optimizer step, FSDP2 with bf16 compute and fp32 master weights
on a GPU, optional CPU offload of parameters and optimizer state) on the same weights and the
same rollout batch; only the forward differs:

- resrl: `forward_logprobs`, the fused `linear_logprob` kernel (no [tokens x vocab] logits) and
  one captured layer of hidden states;
- reference: what the paper's verl recipe does, `model(..., output_hidden_states=True)`: full
  logits upcast to fp32, log-softmax, entropy from the full distribution, and every layer's
  hidden states kept.

Reported per phase (pre-pass, update): seconds, tokens/s and peak GPU memory, from the trainer's
own step metrics. Weights are random (from the model's config) and the rollout is synthetic
(random token ids, lengths uniform in [response_len / 2, response_len], half of each group
positive): sampled text would be meaningless with random weights, and the rollout engine is
measured on its own. Each path runs in a fresh subprocess, so peaks do not leak between paths;
an out-of-memory is reported as such, with the phase it hit, and so are a path stopped at
`--path-timeout` and one skipped because its host memory (below) exceeds what the machine has
available. With `--record` each path's row is appended the moment the path ends.

`--lora-rank R` runs the same step with LoRA adapters of rank R (`model.lora_rank=R`: the trainer's
own LoRA path, `resrl.lora.apply` on the frozen base in the compute dtype, fp32 adapters in every
linear layer of the decoder blocks, the only parameters the optimizer steps). The frozen base is
the model built from the config with random weights, written once to the path's temporary run
folder as the trainer does for a LoRA run without `model.path` (`resrl.lora.base_folder`), then
loaded. Every row carries `lora_rank` (0: full fine-tuning), `trained_params`, `frozen_params` and
`optimizer_state_bytes` (the bytes of the optimizer's state tensors on this rank after the
measured step), so full and LoRA rows of one shape can be set side by side.

Host memory: each path builds one fp32 model on the CPU (4 bytes per parameter; no reference copy:
kl_coef 0); with `--offload` the fp32 master weights, gradients and AdamW state stay there (16
bytes per parameter: Qwen3-4B 64 GB, 8B 131 GB, 14B 236 GB); under LoRA the fp32 build of the base
(4 bytes per parameter) is the most. The child's peak resident memory is in its row
(`host_peak_gib`).

    python bench/bench_step.py --model qwen3-4b                      # both paths, one GPU
    python bench/bench_step.py --model qwen3-4b --offload --paths resrl --path-timeout 220
    python bench/bench_step.py --model qwen3-4b --lora-rank 8        # the same step, LoRA rank 8
    python bench/bench_step.py --model tiny --device cpu             # smoke run (CI does this)
    ... --record                                                      # append to bench/results/step.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results, environment, tests_outcome  # noqa: E402

QWEN3_VOCAB = 151936
# Qwen3 dense checkpoints' shapes (their config.json): hidden, layers, heads, kv heads, MLP width, tied head.
MODELS = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, heads=16, kv=8, mlp=3072, tied=True, vocab=QWEN3_VOCAB),
    "qwen3-1.7b": dict(hidden=2048, layers=28, heads=16, kv=8, mlp=6144, tied=True, vocab=QWEN3_VOCAB),
    "qwen3-4b": dict(hidden=2560, layers=36, heads=32, kv=8, mlp=9728, tied=True, vocab=QWEN3_VOCAB),
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv=8, mlp=12288, tied=False, vocab=QWEN3_VOCAB),
    "qwen3-14b": dict(hidden=5120, layers=40, heads=40, kv=8, mlp=17408, tied=False, vocab=QWEN3_VOCAB),
    "qwen3-32b": dict(hidden=5120, layers=64, heads=64, kv=8, mlp=25600, tied=False, vocab=QWEN3_VOCAB),
    "tiny": dict(hidden=64, layers=2, heads=2, kv=1, mlp=128, tied=True, vocab=512),
}
PATHS = ("resrl", "reference")
PHASES = ("prepass", "update")
# Host bytes per parameter: the fp32 build (without offload it then moves to the GPU), or the fp32
# master weights, gradients and AdamW moments kept on the host by FSDP2's CPU offload.
HOST_BYTES_PER_PARAM = {False: 4, True: 16}
# The process beyond the model: torch, CUDA's host side, pinned staging, the batch.
HOST_OVERHEAD_BYTES = 6 * 2**30


def param_count(model: str) -> int:
    """Parameters of a MODELS entry (Qwen3: q/k/v/o, q/k norms, SwiGLU MLP, two norms per layer)."""
    m = MODELS[model]
    hd = 128 if model != "tiny" else 32
    h = m["hidden"]
    attn = 2 * h * m["heads"] * hd + 2 * h * m["kv"] * hd + 2 * hd
    layer = attn + 3 * h * m["mlp"] + 2 * h
    return m["layers"] * layer + m["vocab"] * h * (1 if m["tied"] else 2) + h


def host_need_bytes(model: str, offload: bool, lora_rank: int = 0) -> int:
    # LoRA: the base's fp32 build (then its compute-dtype copy, on the host with offload); the
    # adapters' state is negligible beside it.
    per_param = 4 if lora_rank else HOST_BYTES_PER_PARAM[offload]
    return param_count(model) * per_param + HOST_OVERHEAD_BYTES


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reference_forward(
    model,
    input_ids,
    attention_mask,
    *,
    temperature=1.0,
    return_entropy=False,
    subspace_layer=None,
    position_ids=None,
    positions=None,
    logprobs=True,
    token_loss=None,
    token_loss_fn=None,
):
    """`forward_logprobs`'s contract computed the reference recipe's way: full logits in fp32 and
    every layer's hidden states (hidden_states[-2] is the input of the last decoder layer), on
    every position; `positions` only picks the response rows out of them afterwards, and the
    logits are computed even when `logprobs` is False (the recipe always computes them), and
    `token_loss` is applied to the selected log-probs through autograd (the recipe's loss)."""
    from resrl.model import position_ids_from_mask

    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    logp_BLV = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)
    logprob = logp_BLV.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)
    entropy = -(logp_BLV.exp() * logp_BLV).sum(-1) if return_entropy else None
    sub = None
    if subspace_layer == "penultimate":
        sub = out.hidden_states[-2][:, :-1].detach()
    elif subspace_layer == "final":
        sub = out.hidden_states[-1][:, :-1].detach()
    if positions is not None:
        logprob = logprob.reshape(-1)[positions]
        entropy = None if entropy is None else entropy.reshape(-1)[positions]
        sub = None if sub is None else sub.reshape(-1, sub.shape[-1])[positions]
    if token_loss_fn is not None:
        token_loss = token_loss_fn(sub_hidden=sub, base_logprob=None)
    if token_loss is not None:
        loss = token_loss(logprob, entropy, slice(0, logprob.shape[0]))
        detached = None if entropy is None else entropy.detach()
        return {"loss": loss, "logprob": logprob.detach(), "entropy": detached, "sub_hidden": sub}
    return {"logprob": logprob, "entropy": entropy, "sub_hidden": sub}


def synthetic_rollout(trainer, args):
    """The trainer's `rollout` replaced: random prompts and responses, half of each group positive."""
    from resrl.batch import RolloutBatch

    vocab = trainer.model.get_input_embeddings().num_embeddings

    def rollout(slots, step):
        gen = torch.Generator().manual_seed(1000 * step + 7)
        prompts, responses, positive, groups = [], [], [], []
        for slot in slots:
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
            for j in range(args.n):
                n = int(
                    torch.randint(max(args.response_len // 2, 1), args.response_len + 1, (1,), generator=gen)
                )
                prompts.append(prompt)
                responses.append(torch.randint(0, vocab, (n,), generator=gen).tolist())
                positive.append(j % 2 == 0)
                groups.append(step * 1_000_000 + slot)
        return RolloutBatch.scored(prompts, responses, positive, groups)

    return rollout


def overrides(args, out_dir: str) -> list[str]:
    m = MODELS[args.model]
    head_dim = 128 if args.model != "tiny" else 32
    return [
        f"model.hidden_size={m['hidden']}",
        f"model.num_layers={m['layers']}",
        f"model.num_heads={m['heads']}",
        f"model.num_kv_heads={m['kv']}",
        f"model.head_dim={head_dim}",
        f"model.intermediate_size={m['mlp']}",
        f"model.vocab_size={m['vocab']}",
        f"model.tie_word_embeddings={str(m['tied']).lower()}",
        f"model.max_position_embeddings={args.prompt_len + args.response_len + 8}",
        f"model.gradient_checkpointing={str(not args.no_checkpointing).lower()}",
        f"model.dtype={'float32' if args.device == 'cpu' else 'bfloat16'}",
        # 0: full fine-tuning; R > 0: LoRA adapters of rank R on a frozen base (`resrl.lora`).
        f"model.lora_rank={args.lora_rank}",
        f"data.task_train_size={max(64, args.prompts)}",
        "data.task_eval_size=4",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.response_len}",
        f"train.prompts_per_step={args.prompts}",
        f"train.mini_batch_prompts={args.prompts}",
        "train.pack=true",
        f"train.max_tokens_per_micro_batch={args.micro_batch_tokens}",
        f"train.cpu_offload={str(args.offload).lower()}",
        f"train.steps={args.steps}",
        "algorithm.objective=resrl",
        # No frozen reference copy: one model per path (host memory above).
        "algorithm.kl_coef=0",
        "sft.steps=0",
        "eval.before=false",
        f"run.device={args.device}",
        f"run.out_dir={out_dir}",
        "run.name=bench",
        "run.tensorboard=false",
        "run.progress=false",
        "run.resume=false",
    ]


def _state_tensors(value) -> list[torch.Tensor]:
    """The plain tensors holding an optimizer state value: itself, a DTensor's local shard, or a
    tensor subclass's inner tensors (torchao's quantized moments)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, torch.Tensor):
        return []
    if isinstance(value, DTensor):
        return _state_tensors(value.to_local())
    if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [t for n in names for t in _state_tensors(getattr(value, n))]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the storages the optimizer's per-parameter state holds on this rank (each storage
    once)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            for t in _state_tensors(value):
                st = t.untyped_storage()
                storages[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(storages.values())


def run_path(args) -> dict:
    """One path in this process: warm-up steps, then the measured step's metrics."""
    from resrl.config import resolve
    from resrl.trainer import Trainer

    row = {"model": args.model, "path": args.path, "offload": args.offload, "lora_rank": args.lora_rank}
    phase = "setup"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(resolve("tiny", overrides=overrides(args, tmp)))
            trainer.rollout = synthetic_rollout(trainer, args)
            if args.path == "reference":
                trainer.policy.forward_fn = reference_forward
            phase = "step"
            for step in range(args.steps):
                t0 = time.perf_counter()
                metrics = trainer.train_step(step)
                metrics["time/wall_s"] = time.perf_counter() - t0
            row["status"] = "ok"
            row["metrics"] = {
                k: v
                for k, v in metrics.items()
                if k.startswith(("time/", "throughput/", "memory/", "loss/", "optim/", "resrl/"))
            }
            if torch.cuda.is_available() and args.device != "cpu":
                row["params_billion"] = sum(p.numel() for p in trainer.model.parameters()) / 1e9
            # DTensors count their global values: the model's, whatever the sharding.
            params = list(trainer.policy.model.parameters())
            row["trained_params"] = sum(p.numel() for p in params if p.requires_grad)
            row["frozen_params"] = sum(p.numel() for p in params if not p.requires_grad)
            row["optim"] = trainer.cfg.optim.name
            row["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizer)
    except torch.cuda.OutOfMemoryError as err:
        row["status"] = "oom"
        row["phase"] = phase
        row["error"] = str(err).splitlines()[0][:300]
    # ru_maxrss is in KiB on Linux.
    row["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = args.prompts * args.n * (args.prompt_len + 0.75 * args.response_len)
    row["shape"] = {
        "prompts": args.prompts,
        "n": args.n,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "micro_batch_tokens": args.micro_batch_tokens,
        "approx_tokens": int(tokens),
    }
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'path':<10} {'phase':<8} {'seconds':>8} {'tokens/s':>10} {'peak GiB':>9}"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['path']:<10} {row.get('phase', ''):<8} {row['status'].upper()}")
            continue
        m = row["metrics"]
        for phase in PHASES:
            peak = m.get(f"memory/{phase}_peak_gib")
            lines.append(
                f"{row['path']:<10} {phase:<8} {m[f'time/{phase}_s']:>8.2f} "
                f"{m.get(f'throughput/{phase}_tokens_per_s', 0.0):>10.0f} "
                f"{'-' if peak is None else f'{peak:.1f}':>9}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-4b")
    parser.add_argument("--paths", default="resrl,reference", help="comma list of: " + ", ".join(PATHS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=2048)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument(
        "--offload", action="store_true", help="FSDP2 CPU offload of parameters and optimizer"
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="model.lora_rank: train LoRA adapters of this rank on a frozen base (default 0: full fine-tuning)",
    )
    parser.add_argument("--steps", type=int, default=2, help="steps per path; the last is reported")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--path-timeout", type=float, default=0, help="seconds per path before it is stopped (0: none)"
    )
    parser.add_argument("--record", action="store_true", help="append the rows to bench/results/step.jsonl")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.path_timeout < 0:
        parser.error(f"--path-timeout must be >= 0 (0: no limit), got {args.path_timeout}")
    for name in ("prompts", "n", "prompt_len", "response_len", "micro_batch_tokens", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths {args.paths!r}: accepted: {', '.join(PATHS)}")
    args.path_list = paths
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def parent_environment(args) -> dict:
    """The row's environment from this process, which never touches CUDA (a context here would hold
    GPU memory while the children measure): the device is named by its kind only."""
    return {**environment(torch.device("cpu")), "device": args.device, "cuda": None}


def run_child(args, path: str, child_args: list[str]) -> dict:
    """One path in a fresh process; a row whatever happens to it (ok, oom, timeout, killed, failed).
    The child prints its environment first, so even a row of a path that died names the device."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *child_args,
        "--path",
        path,
        "--device",
        args.device,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.path_timeout or None)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        # subprocess.run has killed the child; what it printed so far comes back as bytes.
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else b or ""

        code, out, err = None, text(exc.stdout), text(exc.stderr)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    found = [json.loads(line) for line in lines]
    env_row = next((x["env"] for x in found if "env" in x), None) or parent_environment(args)
    if code == 0 and found and "env" not in found[-1]:
        return {**found[-1], **env_row}
    if code is None:
        status = f"timeout ({args.path_timeout:g} s)"
    else:
        status = "killed" if code == -9 else f"failed (exit {code})"
    print(f"bench path {path}: {status}:\n{err[-3000:]}", file=sys.stderr)
    return {"model": args.model, "path": path, "offload": args.offload, "lora_rank": args.lora_rank,
            "status": status, "error": err.strip().splitlines()[-1][:300] if err.strip() else "",
            **env_row}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.path is not None:
        print(json.dumps({"env": environment(torch.device(args.device))}), flush=True)
        print(json.dumps(run_path(args)))
        return []
    tests = tests_outcome(args.device)
    need, available = host_need_bytes(args.model, args.offload, args.lora_rank), host_available_bytes()
    rows = []
    child_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--record"]
    for path in args.path_list:
        if available is not None and need > available:
            row = {"model": args.model, "path": path, "offload": args.offload, "lora_rank": args.lora_rank,
                   "status": f"skipped: needs ~{need / 2**30:.0f} GiB host memory, {available / 2**30:.0f} available",
                   **parent_environment(args)}  # fmt: skip
        else:
            try:
                row = run_child(args, path, child_args)
            except KeyboardInterrupt:
                # Stopped from outside (gpu_check.sh's budget sends SIGINT; the child is killed):
                # the path in flight is recorded as such before this process ends.
                row = {"model": args.model, "path": path, "offload": args.offload,
                       "lora_rank": args.lora_rank, "status": "interrupted", **parent_environment(args)}  # fmt: skip
        row.update(host_need_gib=need / 2**30, tests=tests)
        rows.append(row)
        if args.record:
            print("recorded in", append_results("step.jsonl", [row]))
        if row["status"] == "interrupted":
            raise SystemExit(f"bench_step: interrupted during the {path} path")
    tokens = args.prompts * args.n * (args.prompt_len + 0.75 * args.response_len)
    lora = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    print(
        f"{args.model}, ~{int(tokens)} tokens/step, {lora}, offload={args.offload}, {rows[0].get('device', '?')}"
    )
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
