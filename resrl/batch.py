"""A rollout batch as the update sees it, and how its sequences become padded micro-batch tensors.

Per-token values (sampling, old and reference log-probs, ResRL weights) are stored per sequence as
1-D tensors over the response tokens and scattered into the [b, L-1] logprob layout of whichever
micro-batch the sequence lands in, so no phase depends on another phase's batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resrl.rollout import Sample


@dataclass
class RolloutBatch:
    """B = prompts x G sequences of one RL step, grouped by prompt (group[i] = prompt slot)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sample_logprob: list[torch.Tensor]  # per sequence [R_i] fp32, from the rollout engine
    rewards: torch.Tensor  # [B] fp32
    positive: torch.Tensor  # [B] bool
    truncated: torch.Tensor  # [B] bool
    group: torch.Tensor  # [B] int64, global prompt-group id (seeds ResRL's subsampling)
    token_values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Per-token values filled by the pre-pass: old_logprob, ref_logprob, resrl_weight."""

    @classmethod
    def from_samples(
        cls, samples: list[list[Sample]], rewards: list[float], positive: list[bool], group_ids: list[int]
    ) -> RolloutBatch:
        flat = [s for group in samples for s in group]
        groups = [g for g, group in zip(group_ids, samples, strict=True) for _ in group]
        return cls(
            prompt_ids=[s.prompt_ids for s in flat],
            response_ids=[s.response_ids for s in flat],
            sample_logprob=[torch.tensor(s.logprobs, dtype=torch.float32) for s in flat],
            rewards=torch.tensor(rewards, dtype=torch.float32),
            positive=torch.tensor(positive, dtype=torch.bool),
            truncated=torch.tensor([s.truncated for s in flat], dtype=torch.bool),
            group=torch.tensor(groups, dtype=torch.long),
        )

    def __len__(self) -> int:
        return len(self.response_ids)

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def micro_batches(self, indices: list[int], size: int) -> list[list[int]]:
        """`indices` in chunks of `size`, longest sequences first so padding stays small."""
        lengths = [len(self.prompt_ids[i]) + len(self.response_ids[i]) for i in indices]
        order = [indices[j] for j in sorted(range(len(indices)), key=lambda j: -lengths[j])]
        return [order[s : s + size] for s in range(0, len(order), size)]

    def collate(self, idx: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """`pad_sequences` of the sequences `idx`, plus every per-token value present (scattered into
        the same [b, L-1] layout), rewards and positive flags, on `device`."""
        ids_BL, mask_BL, resp_BT = pad_sequences(
            [self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx], pad_id
        )
        b, seq_len = ids_BL.shape
        spans = [(len(self.prompt_ids[i]) - 1, len(self.response_ids[i])) for i in idx]
        out = {"input_ids": ids_BL, "attention_mask": mask_BL, "resp_mask": resp_BT}
        values = {"sample_logprob": self.sample_logprob, **self.token_values}
        for name, per_seq in values.items():
            t_BT = torch.zeros(b, seq_len - 1, dtype=torch.float32)
            for row, (i, (start, n)) in enumerate(zip(idx, spans, strict=True)):
                t_BT[row, start : start + n] = per_seq[i]
            out[name] = t_BT
        out["rewards"] = self.rewards[idx]
        out["positive"] = self.positive[idx]
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def pad_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids and attention mask [b, L], and resp_mask [b, L-1] in the
    logprob layout (position t scores token t+1, so response token j of a prompt of length p sits
    at position p - 1 + j)."""
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    b = len(prompts)
    ids_BL = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(b, seq_len, dtype=torch.long)
    resp_BT = torch.zeros(b, seq_len - 1, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"sequence {row} has an empty prompt; every prompt needs at least one token")
        ids_BL[row, : len(p) + len(r)] = torch.tensor(p + r)
        mask_BL[row, : len(p) + len(r)] = 1
        resp_BT[row, len(p) - 1 : len(p) - 1 + len(r)] = True
    return ids_BL, mask_BL, resp_BT


def split_rows(values_BT: torch.Tensor, resp_BT: torch.Tensor) -> list[torch.Tensor]:
    """The response tokens of each row of a [b, L-1] tensor, as CPU fp32 1-D tensors."""
    values_BT, resp_BT = values_BT.detach().float().cpu(), resp_BT.cpu()
    return [values_BT[row][resp_BT[row]] for row in range(values_BT.shape[0])]
