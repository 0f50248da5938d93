"""LoRA rollout in vLLM: merged weights streamed (resrl's default) against vLLM serving the adapter.

Two ways for the engine to sample a LoRA policy:
- merged: the engine holds W + (alpha/r) B A; every sync streams all weights (`VLLMEngine.sync_weights`,
  `resrl.lora.hf_tensors`), sampling costs what the base model costs;
- adapter: the engine holds the frozen base and serves the adapter (`enable_lora`, a `LoRARequest`
  per sync pointing at a PEFT folder written by `resrl.lora.save_adapter`); a sync writes and loads
  only the adapter, but every token pays the adapter's extra GEMMs.
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

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

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

    def merged_generate() -> int:
        out = engine.generate(prompts, ours)
        return sum(len(s.response_ids) for group in out for s in group)

    t = time.perf_counter()
    engine.sync_weights(adapted)
    sync = time.perf_counter() - t
    rows.append({"mode": "merged", "ms_per_token": 1e3 * per_token(merged_generate), "sync_s": sync})
    engine.close()

    # adapter: vLLM's LoRA support on the frozen base.
    llm = LLM(
        model=str(work / "base"), tokenizer=str(work / "base"), dtype="float32", max_model_len=256,
        enforce_eager=True, enable_lora=True, max_lora_rank=args.rank, seed=0,
        kv_cache_memory_bytes=engine_kv_bytes(base, args),
    )  # fmt: skip
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.tokens, logprobs=0, seed=1)
    requests = [{"prompt_token_ids": p} for p in prompts]
    state = lora.adapter_state(adapted.named_parameters())
    ids = iter(range(1, 1 << 30))

    def adapter_sync() -> LoRARequest:
        folder = work / "adapter"
        lora.save_adapter(folder, adapted, state, str(work / "base"))
        request = LoRARequest(f"policy-{next(ids)}", next(ids), str(folder))
        # The engine loads an adapter when a request first names it: part of the sync.
        llm.generate(requests[:1], SamplingParams(max_tokens=1), lora_request=request, use_tqdm=False)
        return request

    adapter_sync()
    t = time.perf_counter()
    request = adapter_sync()
    sync = time.perf_counter() - t

    def adapter_generate() -> int:
        out = llm.generate(requests, params, lora_request=request, use_tqdm=False)
        return sum(len(c.token_ids) for o in out for c in o.outputs)

    rows.append({"mode": "adapter", "ms_per_token": 1e3 * per_token(adapter_generate), "sync_s": sync})
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


def engine_kv_bytes(model, args) -> int:
    """KV cache room for every sequence of the batch at full length, fp32."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * 256 * args.prompts * args.n


if __name__ == "__main__":
    sys.exit(main())
