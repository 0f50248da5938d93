"""The evaluation runner: sample n responses per problem through a rollout engine, score, summarize.

Used by ``resrl eval`` and by the trainer's periodic evaluation; it only needs the
``RolloutEngine`` protocol, so the HF and vLLM engines are interchangeable here.

Problems go to the engine in chunks of ``batch_prompts``; chunk i samples with a seed derived from
(``seed``, i) alone, so a run is fixed by its seed, inputs and chunk size, never by global RNG state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from resrl.data import Example, encode_prompt
from resrl.eval.diversity import diversity_metrics
from resrl.eval.metrics import summarize
from resrl.rewards import extract_answer, get_batch_reward
from resrl.rollout import RolloutEngine, Sample, SamplingParams

# Longer answers are not cheap plain numbers; they pool by their stripped text.
_MAX_NUMBER_CHARS = 64
# Plain integers, decimals and a/b fractions only: Fraction() would also accept exponents such as
# "1e999999999", whose exact value takes minutes to build.
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)|[+-]?\d+\s*/\s*\d+")

EntropyFn = Callable[[list[Sample]], Sequence[float]]


def canonical_answer(answer: str | None) -> str | None:
    """The form answers are pooled under for maj@k and counted by the diversity metrics.

    Plain integers, decimals and ``a/b`` fractions become their exact value in lowest terms
    (``"09"`` -> ``"9"``, ``"0.5"`` and ``"1/2"`` -> ``"1/2"``, ``"-4.0"`` -> ``"-4"``); anything
    else is the stripped text. None (no answer) stays None.
    """
    if answer is None:
        return None
    text = answer.strip()
    if len(text) <= _MAX_NUMBER_CHARS and _NUMBER_RE.fullmatch(text):
        try:
            return str(Fraction(text.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            return text
    return text


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk`` (a 31-bit int, so every engine accepts it)."""
    digest = hashlib.sha256(f"resrl-eval:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class EvalResult:
    """Summary metrics and one row per problem (samples included).

    ``summary``: ``metrics.summarize`` (pass@k for k = 1, 2, 4, ... n, avg@n, maj@n, per
    data_source when there are several), the diversity metrics, ``mean_response_length`` (tokens
    per sample), ``truncated_frac``, ``mean_token_nll`` (minus the mean sampling log-prob per
    token, pooled over all tokens: a cheap proxy for the entropy of the samples), ``n_problems``,
    ``n_samples`` (all samples scored) and, with an ``entropy_fn``, ``mean_token_entropy``.
    """

    summary: dict[str, float]
    rows: list[dict]

    def write(self, out_dir: str | os.PathLike, name: str = "eval") -> tuple[Path, Path]:
        """Write ``<name>_summary.json`` and ``<name>_samples.jsonl`` (one problem per line) under
        ``out_dir`` (created if missing); returns (summary path, samples path)."""
        if not isinstance(name, str) or not name or "/" in name or os.sep in name:
            raise ValueError(
                f"name must be a non-empty file-name prefix without path separators, got {name!r}"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary_path, samples_path = out / f"{name}_summary.json", out / f"{name}_samples.jsonl"
        summary_path.write_text(json.dumps(self.summary, indent=2) + "\n", encoding="utf-8")
        with samples_path.open("w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return summary_path, samples_path


def _prompt_text(example: Example) -> str:
    if isinstance(example.prompt, str):
        return example.prompt
    return example.prompt[-1]["content"]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_output(out: Any, n_prompts: int, n: int, chunk: int) -> list[list[Sample]]:
    if not isinstance(out, list) or len(out) != n_prompts:
        got = len(out) if isinstance(out, list) else type(out).__name__
        raise RuntimeError(f"engine.generate returned {got} results for {n_prompts} prompts (chunk {chunk})")
    for i, samples in enumerate(out):
        if len(samples) != n:
            raise RuntimeError(
                f"engine.generate gave {len(samples)} samples for prompt {i} of chunk {chunk}, asked n={n}"
            )
        for j, sample in enumerate(samples):
            if len(sample.logprobs) != len(sample.response_ids):
                raise RuntimeError(
                    f"engine sample {j} of prompt {i} (chunk {chunk}) has {len(sample.response_ids)} tokens "
                    f"but {len(sample.logprobs)} logprobs"
                )
    return out


def _entropies(entropy_fn: EntropyFn, samples: list[Sample]) -> list[float]:
    values = [float(v) for v in entropy_fn(samples)]
    if len(values) != len(samples):
        raise ValueError(f"entropy_fn returned {len(values)} values for {len(samples)} samples")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"entropy_fn returned non-finite entropies: {values}")
    return values


def _text(sample: Sample, tokenizer: Any) -> str:
    if not sample.text and sample.response_ids:
        return tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    return sample.text


def _row(example: Example, samples: list[Sample], responses: list[str], rewards: list[float]) -> dict:
    """One problem's row: its samples, their texts and their rewards (wrong = 0)."""
    correct = [reward > 0 for reward in rewards]
    # A truncated response never committed to an answer (the reward calls it wrong), so it casts
    # no vote in maj@k and names no answer in the diversity counts.
    answers = [
        None if sample.truncated else canonical_answer(extract_answer(text))
        for sample, text in zip(samples, responses, strict=True)
    ]
    return {
        "index": example.index,
        "data_source": example.data_source,
        "prompt": _prompt_text(example),
        "answer": example.answer,
        "n": len(samples),
        "c": sum(correct),
        "answers": answers,
        "correct": correct,
        "rewards": rewards,
        "responses": responses,
        "lengths": [len(s.response_ids) for s in samples],
        "truncated": [bool(s.truncated) for s in samples],
        "mean_logprob": [sum(s.logprobs) / len(s.logprobs) if s.logprobs else None for s in samples],
    }


def _summary(rows: list[dict], samples: list[Sample], entropy: list[float] | None) -> dict[str, float]:
    summary = summarize(rows)
    summary.update(diversity_metrics(rows))
    tokens = sum(len(s.response_ids) for s in samples)
    summary["mean_response_length"] = tokens / len(samples)
    summary["truncated_frac"] = sum(bool(s.truncated) for s in samples) / len(samples)
    # 0 only when no token was sampled at all, which a conforming engine never does (EOS counts).
    summary["mean_token_nll"] = -sum(sum(s.logprobs) for s in samples) / tokens if tokens else 0.0
    if entropy is not None:
        weighted = sum(e * len(s.response_ids) for e, s in zip(entropy, samples, strict=True))
        summary["mean_token_entropy"] = weighted / tokens if tokens else 0.0
    summary["n_problems"] = float(len(rows))
    summary["n_samples"] = float(len(samples))
    return summary


def evaluate(
    engine: RolloutEngine,
    examples: list[Example],
    tokenizer: Any,
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int = 0,
    reward: str = "math",
    batch_prompts: int = 64,
    entropy_fn: EntropyFn | None = None,
    progress: bool | str = False,
    part: tuple[int, int] = (0, 1),
    gather: Callable[[Any], list] | None = None,
) -> EvalResult:
    """Sample ``n`` responses per example, score them with the ``reward`` function and summarize.

    A sample is correct when its reward is > 0 (wrong responses get 0). ``entropy_fn``, when given,
    maps a chunk's samples (problem-major, flat) to each sample's mean per-token entropy (e.g. from
    a forward pass of the policy); rows then carry ``entropy`` and the summary
    ``mean_token_entropy`` (token-weighted). ``progress`` prints one line per chunk to stderr,
    starting with ``progress`` when it is a string (which evaluation), else with "eval"; with
    several processes it counts this rank's share of the problems, and says so.

    Several processes: ``part=(rank, size)`` samples only the chunks of ``batch_prompts`` problems
    whose index is ``rank`` modulo ``size``, and ``gather`` (every rank's object in rank order, e.g.
    an all-gather) collects them; every rank returns the whole result, the same as one process
    gives, since each chunk is seeded by its index alone.
    """
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"examples must be a non-empty list of Example, got {examples!r:.80}")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"examples[{i}] must be a resrl.data.Example, got {type(example).__name__}")
    _check_int("n", n, 1)
    _check_int("batch_prompts", batch_prompts, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if entropy_fn is not None and not callable(entropy_fn):
        raise TypeError(f"entropy_fn must be callable or None, got {type(entropy_fn).__name__}")
    if (
        not isinstance(part, tuple)
        or len(part) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in part)
        or not 0 <= part[0] < part[1]
    ):
        raise ValueError(f"part must be (rank, size) with 0 <= rank < size, got {part!r}")
    if part[1] > 1 and not callable(gather):
        raise ValueError(f"part={part} (several processes) needs a gather function")
    reward_fn = get_batch_reward(reward)
    params = SamplingParams(
        n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
    )
    # Encoded up front so a prompt the tokenizer cannot take fails before any sampling.
    prompts_all = [encode_prompt(example, tokenizer) for example in examples]

    rank, size = part
    done: list[tuple[int, list[dict], list[Sample], list[float] | None]] = []
    start = time.perf_counter()
    # Progress counts this rank's problems: the other ranks' are only known at the gather.
    share = sum(
        len(examples[lo : lo + batch_prompts])
        for lo in range(rank * batch_prompts, len(examples), size * batch_prompts)
    )
    sampled = 0
    for chunk, lo in enumerate(range(0, len(examples), batch_prompts)):
        if chunk % size != rank:
            continue
        batch = examples[lo : lo + batch_prompts]
        prompts = prompts_all[lo : lo + batch_prompts]
        chunk_params = dataclasses.replace(params, seed=chunk_seed(seed, chunk))
        out = _check_output(engine.generate(prompts, chunk_params), len(prompts), n, chunk)
        flat = [sample for samples in out for sample in samples]
        chunk_entropy = _entropies(entropy_fn, flat) if entropy_fn is not None else None
        # The whole chunk is scored at once: identical answers verified once, in parallel workers.
        texts = [_text(sample, tokenizer) for sample in flat]
        scores = [
            float(score)
            for score in reward_fn(
                texts,
                [example.answer for example in batch for _ in range(n)],
                truncated=[sample.truncated for sample in flat],
                negative_reward=0.0,
                rows=[example for example in batch for _ in range(n)],
            )
        ]
        if len(scores) != len(flat):
            raise RuntimeError(f"reward {reward!r} gave {len(scores)} rewards for {len(flat)} samples")
        chunk_rows = []
        for i, (example, samples) in enumerate(zip(batch, out, strict=True)):
            row = _row(example, samples, texts[i * n : (i + 1) * n], scores[i * n : (i + 1) * n])
            if chunk_entropy is not None:
                row["entropy"] = chunk_entropy[i * n : (i + 1) * n]
            chunk_rows.append(row)
        done.append((chunk, chunk_rows, flat, chunk_entropy))
        sampled += len(batch)
        if progress:
            elapsed = time.perf_counter() - start
            label = progress if isinstance(progress, str) else "eval"
            whose = "" if size == 1 else f" (rank {rank}'s share of {len(examples)} over {size} processes)"
            print(f"{label}: {sampled}/{share} problems{whose}, {elapsed:.1f} s", file=sys.stderr, flush=True)
    if size > 1:
        done = sorted((item for got in gather(done) for item in got), key=lambda item: item[0])
    rows = [row for _, chunk_rows, _, _ in done for row in chunk_rows]
    all_samples = [sample for _, _, flat, _ in done for sample in flat]
    entropy = [e for _, _, _, chunk_entropy in done for e in (chunk_entropy or [])]
    summary = _summary(rows, all_samples, entropy if entropy_fn is not None else None)
    return EvalResult(summary=summary, rows=rows)
