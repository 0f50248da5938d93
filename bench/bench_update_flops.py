"""LM-head FLOPs of one RL step, before and after issue 13, from the batch shapes the trainer sees.

The LM head (logits = h·Wᵀ over a V-word vocabulary, D wide) costs 2·V·D FLOPs per row and pass.
Per step it runs in:

- the pre-pass: one forward per row of the policy (before: always, on every position of every
  micro-batch, prompt and padding included; after: only on response rows, and only when the
  update needs old log-probs) and of the KL reference when there is one;
- the update: forward + backward per row of every micro-batch of every optimizer step: 8·V·D
  when the backward recomputes the logits (`linear_logprob`, today's Triton path), 6·V·D when the
  loss is formed inside the pass (`linear_logprob_loss`'s PyTorch path, issue 13 part 2).

Rows are counted with the trainer's own micro-batching (`RolloutBatch.chunks` for the pre-pass,
positives first; `RolloutBatch.micro_batches` per mini-batch for the update), padded ([b, L-1]
positions per micro-batch) and packed (one row of all tokens). Batches:

- demo: the `tiny` preset's step: 32 of its real prompts x 16 responses with the lengths of
  reference solutions (what the warm start imitates; sampling the warm-started policy takes
  minutes, and its response lengths follow the solutions');
- paper: shaped like the ResRL paper's recipe (Qwen3-4B: D=2560, V=151936; 256 prompts x 4
  responses, mini-batch 64 prompts, so 4 updates and old log-probs), prompts of 200-600 tokens,
  responses of 256-4096 tokens (uniform, seeded) with one in five cut at 4096.

    python bench/bench_update_flops.py [--record]     # prints the table; --record appends rows
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results, environment  # noqa: E402
from resrl.batch import RolloutBatch  # noqa: E402

# FLOPs per row and pass, in units of V·D: forward; forward + backward recomputing the logits;
# forward + backward with the gradient formed while the logits exist.
FWD, FWD_BWD_RECOMPUTE, FWD_BWD_FUSED = 2, 8, 6


def demo_batch(seed: int = 0) -> tuple[RolloutBatch, dict]:
    """The `tiny` preset's step: its first 32 training prompts (the real token ids) x 16 responses
    whose lengths are those of reference solutions (+ EOS, what the warm start imitates, capped at
    rollout.max_new_tokens), drawn at random from the training set."""
    from resrl.config import resolve
    from resrl.loading import PromptSampler, load_task
    from resrl.sft import solution_ids

    cfg = resolve("tiny")
    tokenizer, train_set, _ = load_task(cfg)
    lengths = [min(len(s), cfg.rollout.max_new_tokens) for s in solution_ids(train_set.examples, tokenizer)]
    sampler = PromptSampler(len(train_set.examples), cfg.train.prompts_per_step, seed=seed, shuffle=True)
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, positive, group = [], [], [], []
    for slot in sampler.next():
        for j in range(cfg.rollout.n):
            n = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
            prompts.append(train_set.prompt_ids[slot])
            responses.append([1] * n)
            positive.append(j % 2 == 0)
            group.append(slot)
    batch = RolloutBatch.scored(prompts, responses, positive, group)
    m = cfg.model
    shape = {
        "V": len(tokenizer),
        "D": m.hidden_size,
        "group": cfg.rollout.n,
        "mini_batch_prompts": cfg.train.mini_batch_prompts,
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_tokens_per_micro_batch": cfg.train.max_tokens_per_micro_batch,
        "updates": cfg.train.prompts_per_step // cfg.train.mini_batch_prompts * cfg.train.epochs_per_batch,
    }
    return batch, shape


def paper_batch(seed: int = 0) -> tuple[RolloutBatch, dict]:
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, positive, group = [], [], [], []
    for p in range(256):
        prompt_len = int(torch.randint(200, 601, (1,), generator=gen))
        for j in range(4):
            cut = bool(torch.rand(1, generator=gen) < 0.2)
            n = 4096 if cut else int(torch.randint(256, 4097, (1,), generator=gen))
            prompts.append([1] * prompt_len)
            responses.append([1] * n)
            positive.append(not cut and j % 2 == 0)
            group.append(p)
    batch = RolloutBatch.scored(prompts, responses, positive, group)
    shape = {
        "V": 151936,
        "D": 2560,
        "group": 4,
        "mini_batch_prompts": 64,
        "micro_batch_size": 8,
        "max_tokens_per_micro_batch": 16384,
        "updates": 4,
    }
    return batch, shape


def rows(batch: RolloutBatch, chunks: list[list[int]], packed: bool) -> int:
    """LM-head rows of these micro-batches when every position is scored (before issue 13)."""
    total = 0
    for idx in chunks:
        lengths = [batch.length(i) for i in idx]
        total += sum(lengths) - 1 if packed else len(idx) * (max(lengths) - 1)
    return total


def count(batch: RolloutBatch, shape: dict, packed: bool) -> dict:
    """LM-head rows and FLOPs of one step, before and after, for one layout."""
    budget = shape["max_tokens_per_micro_batch"] if packed else 0
    size = shape["micro_batch_size"]
    n = len(batch)
    positive = batch.positive.tolist()
    order = [i for i in range(n) if positive[i]] + [i for i in range(n) if not positive[i]]
    g, mbp = shape["group"], shape["mini_batch_prompts"]
    prompts = n // g
    mini_batches = [
        [p * g + j for p in range(k, min(k + mbp, prompts)) for j in range(g)] for k in range(0, prompts, mbp)
    ]
    epochs = shape["updates"] // len(mini_batches)
    update_chunks = [c for mb in mini_batches for c in batch.micro_batches(mb, size, budget)] * epochs
    response = int(batch.response_lengths().sum())
    need_old = shape["updates"] > 1
    before_prepass = rows(batch, batch.chunks(order, size, budget), packed)
    before_update = rows(batch, update_chunks, packed)
    vd = shape["V"] * shape["D"]
    after_prepass = response if need_old else 0
    after_update = response * epochs
    return {
        "layout": "packed" if packed else "padded",
        "response_tokens": response,
        "all_tokens": sum(batch.length(i) for i in range(n)),
        "rows_before": {"prepass": before_prepass, "update": before_update},
        "rows_after": {"prepass": after_prepass, "update": after_update},
        "flops_before": vd * (FWD * before_prepass + FWD_BWD_RECOMPUTE * before_update),
        "flops_after_recompute": vd * (FWD * after_prepass + FWD_BWD_RECOMPUTE * after_update),
        "flops_after_fused": vd * (FWD * after_prepass + FWD_BWD_FUSED * after_update),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| batch | layout | rows pre-pass / update, before | after | LM-head TFLOP before | after (8VD) "
        "| after (fused, 6VD) | before / after (fused) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, a = r["rows_before"], r["rows_after"]
        lines.append(
            f"| {r['batch']} | {r['layout']} | {b['prepass']:,} / {b['update']:,} | {a['prepass']:,} / "
            f"{a['update']:,} | {r['flops_before'] / 1e12:.4g} | {r['flops_after_recompute'] / 1e12:.4g} | "
            f"{r['flops_after_fused'] / 1e12:.4g} | {r['flops_before'] / r['flops_after_fused']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--record", action="store_true", help="append rows to bench/results/update_flops.jsonl"
    )
    parser.add_argument("--batches", default="demo,paper", help="comma list of: demo, paper")
    parser.add_argument(
        "--demo-sft-steps", type=int, default=None, help="warm-start steps (default: the preset's)"
    )
    args = parser.parse_args(argv)
    wanted = [b for b in args.batches.split(",") if b]
    if not wanted or any(b not in ("demo", "paper") for b in wanted):
        parser.error(f"--batches {args.batches!r}: accepted: demo, paper")
    results = []
    for name in wanted:
        batch, shape = demo_batch() if name == "demo" else paper_batch()
        for packed in (False, True):
            results.append({"batch": name, "shape": shape, **count(batch, shape, packed)})
    print(table(results))
    if args.record:
        env = environment(torch.device("cpu"))
        print("recorded in", append_results("update_flops.jsonl", [{**r, **env} for r in results]))
    return results


if __name__ == "__main__":
    main()
