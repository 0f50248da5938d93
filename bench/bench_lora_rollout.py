"""LoRA rollout in vLLM: merged weights streamed (resrl's default) against vLLM serving the adapter.

Two ways for the engine to sample a LoRA policy:
- merged: the engine holds W + (alpha/r) B A; every sync streams all weights (`VLLMEngine.sync_weights`,
  `resrl.lora.hf_tensors`), sampling costs what the base model costs;
- adapter (`rollout.lora_serving=adapter`): the engine holds the frozen base and serves the adapter
  (`enable_lora`, a `LoRARequest` per sync naming a PEFT folder written by `resrl.lora.save_adapter`);
  a sync writes and loads only the adapter, but every token pays the adapter's extra GEMMs.
Both go through `VLLMEngine`, the trainer's engine, with its default KV cache.
Reported per mode: sampling time per token (G responses of fixed length per prompt, after a warm-up)
and the sync time. Run in the vLLM environment (`make setup-vllm`):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_lora_rollout.py --rank 8 [--record]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from bench.common import append_results, environment  # noqa: E402
from resrl import lora  # noqa: E402
from resrl.config import resolve  # noqa: E402
from resrl.model import build_qwen3  # noqa: E402
from resrl.rollout import SamplingParams as OurParams  # noqa: E402
from resrl.rollout.vllm_engine import VLLMEngine  # noqa: E402
from resrl.tasks import build_char_tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append rows to bench/results/lora_rollout.jsonl")
    args = ap.parse_args()

    tok = build_char_tokenizer()
    base = build_qwen3(
        vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=3 * args.hidden, max_position_embeddings=256,
    )  # fmt: skip
    adapted = lora.apply(
        copy.deepcopy(base), resolve("tiny", overrides=[f"model.lora_rank={args.rank}"]), torch.float32
    )
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    work = Path(tempfile.mkdtemp(prefix="lora-rollout-"))
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    prompts = [[tok.bos_token_id, *tok.encode(f"{k}+{k + 7}=")] for k in range(args.prompts)]
    rows = []

    def per_token(generate) -> float:
        generate()
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            n = generate()
            best = min(best, (time.perf_counter() - t) / n)
        return best

    # merged: resrl's engine, syncing the adapted model's merged weights.
    engine = VLLMEngine(base, tok, model_dir=work / "base", max_model_len=256)
    ours = OurParams(n=args.n, temperature=1.0, max_new_tokens=args.tokens, seed=1)

    def sample() -> int:
        # `engine` is whichever engine is being measured.
        out = engine.generate(prompts, ours)
        return sum(len(s.response_ids) for group in out for s in group)

    engine.sync_weights(adapted)
    t = time.perf_counter()
    engine.sync_weights(adapted)
    sync = time.perf_counter() - t
    rows.append({"mode": "merged", "ms_per_token": 1e3 * per_token(sample), "sync_s": sync})
    engine.close()

    # adapter: the same engine serving the adapter on the frozen base (rollout.lora_serving=adapter).
    engine = VLLMEngine(
        base,
        tok,
        model_dir=work / "base",
        max_model_len=256,
        lora_rank=args.rank,
        adapter_dir=work / "adapters",
    )

    def adapter_sync() -> None:
        engine.sync_weights(adapted)
        # vLLM loads an adapter when a request first names it: part of the sync.
        engine.generate(prompts[:1], OurParams(n=1, temperature=1.0, max_new_tokens=1, seed=0))

    adapter_sync()
    t = time.perf_counter()
    adapter_sync()
    sync = time.perf_counter() - t
    rows.append({"mode": "adapter", "ms_per_token": 1e3 * per_token(sample), "sync_s": sync})
    engine.close()
    import vllm

    info = {**environment(torch.device("cpu")), "vllm": vllm.__version__}
    shape = {
        "hidden": args.hidden,
        "layers": args.layers,
        "rank": args.rank,
        "prompts": args.prompts,
        "n": args.n,
    }
    for row in rows:
        print(f"{row['mode']:>8}: {row['ms_per_token']:.3f} ms/token, sync {row['sync_s'] * 1e3:.1f} ms")
        if args.record:
            append_results("lora_rollout.jsonl", [{**shape, **row, **info}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
