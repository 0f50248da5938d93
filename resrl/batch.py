"""A rollout batch as the update sees it, and how its sequences become micro-batch tensors.

Per-token values (sampling, old and reference log-probs, ResRL weights) are stored per sequence as
1-D tensors over the response tokens. A micro-batch is either padded ([b, L] with an attention mask)
or packed (one row, positions restarting per sequence, no padding). The LM head scores only the
response rows (`positions`); `responses_from_rows` puts its outputs into one "response layout"
[b, T] (`responses_of` does the same from every position's output), where losses, pre-pass and
metrics are computed, so no phase depends on how another phase batched.
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
    reward_class: torch.Tensor | None = None
    """[B] fp32, the reward before length scaling (R²PO's rarity key: a length-scaled reward is
    continuous); None: the rewards themselves."""

    @classmethod
    def from_samples(
        cls,
        samples: list[list[Sample]],
        rewards: list[float],
        positive: list[bool],
        group_ids: list[int],
        reward_class: list[float] | None = None,
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
            reward_class=None if reward_class is None else torch.tensor(reward_class, dtype=torch.float32),
        )

    @classmethod
    def scored(
        cls,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        positive: list[bool],
        group: list[int],
        sample_logprob: list[torch.Tensor] | None = None,
    ) -> RolloutBatch:
        """A batch from given responses (tests, benchmarks): reward +1 / -1 by `positive`, none
        truncated, sampling log-probs 0 unless given."""
        if sample_logprob is None:
            sample_logprob = [torch.zeros(len(r)) for r in response_ids]
        return cls(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            sample_logprob=sample_logprob,
            rewards=torch.tensor([1.0 if p else -1.0 for p in positive]),
            positive=torch.tensor(positive, dtype=torch.bool),
            truncated=torch.zeros(len(prompt_ids), dtype=torch.bool),
            group=torch.tensor(group, dtype=torch.long),
        )

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: list[int]) -> RolloutBatch:
        """The sequences `rows`, in that order, with their per-token values."""
        return RolloutBatch(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            response_ids=[self.response_ids[i] for i in rows],
            sample_logprob=[self.sample_logprob[i] for i in rows],
            rewards=self.rewards[rows],
            positive=self.positive[rows],
            truncated=self.truncated[rows],
            group=self.group[rows],
            token_values={k: [v[i] for i in rows] for k, v in self.token_values.items()},
            reward_class=None if self.reward_class is None else self.reward_class[rows],
        )

    @classmethod
    def concat(cls, batches: list[RolloutBatch]) -> RolloutBatch:
        """The sequences of `batches` one after the other (per-token values only where all have them)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        keys = set.intersection(*(set(b.token_values) for b in batches))
        return cls(
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            response_ids=[r for b in batches for r in b.response_ids],
            sample_logprob=[t for b in batches for t in b.sample_logprob],
            rewards=torch.cat([b.rewards for b in batches]),
            positive=torch.cat([b.positive for b in batches]),
            truncated=torch.cat([b.truncated for b in batches]),
            group=torch.cat([b.group for b in batches]),
            token_values={k: [t for b in batches for t in b.token_values[k]] for k in sorted(keys)},
            reward_class=None
            if any(b.reward_class is None for b in batches)
            else torch.cat([b.reward_class for b in batches]),
        )

    def step_metrics(self, n_prompts: int) -> dict[str, float]:
        """The rollout's metrics (reward/*, response/*) and "_tokens", its prompt+response tokens."""
        lengths = self.response_lengths().float()
        acc_G = self.positive.float().view(n_prompts, -1).mean(1)
        return {
            "reward/mean": float(self.rewards.mean()),
            "reward/accuracy": float(self.positive.float().mean()),
            "reward/groups_all_correct": float((acc_G == 1).float().mean()),
            "reward/groups_all_wrong": float((acc_G == 0).float().mean()),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(self.truncated.float().mean()),
            "_tokens": float(sum(self.length(i) for i in range(len(self)))),
        }

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def micro_batches(self, indices: list[int], size: int, max_tokens: int = 0) -> list[list[int]]:
        """Split `indices` into micro-batches, longest sequences first.

        `max_tokens` 0: chunks of `size` sequences (padded). Otherwise (packing): greedy chunks whose
        prompt+response tokens stay within `max_tokens`; a sequence longer than the budget gets a
        micro-batch of its own.
        """
        order = sorted(indices, key=lambda i: -self.length(i))
        return self.chunks(order, size, max_tokens)

    def group_micro_batches(
        self, indices: list[int], size: int, max_tokens: int = 0
    ) -> tuple[list[list[int]], set[int]]:
        """Micro-batches that hold whole prompt groups where a group fits one, and the ids of the
        groups held whole (ResRL weighs those inside the update's forward, `resrl.weights`).

        Groups are taken longest first (by their longest sequence: similar lengths share a padded
        micro-batch) and packed greedily, up to `size` sequences (padded) or `max_tokens` tokens
        (packing). A group that fits no micro-batch is cut like `micro_batches` after the others.
        The plan depends on the set of `indices`, not their order (the trainer and the update
        plan the same batch independently)."""
        members: dict[int, list[int]] = {}
        for i in sorted(indices):
            members.setdefault(int(self.group[i]), []).append(i)
        cost = (lambda m: sum(self.length(i) for i in m)) if max_tokens else len
        limit = max_tokens or size
        by_length = sorted(members, key=lambda g: (-max(self.length(i) for i in members[g]), g))
        whole = [g for g in by_length if cost(members[g]) <= limit]
        out: list[list[int]] = []
        used = limit
        for g in whole:
            c = cost(members[g])
            if used + c > limit:
                out.append([])
                used = 0
            out[-1].extend(members[g])
            used += c
        rest = [i for g in by_length if cost(members[g]) > limit for i in members[g]]
        return out + self.micro_batches(rest, size, max_tokens), set(whole)

    def length(self, i: int) -> int:
        return len(self.prompt_ids[i]) + len(self.response_ids[i])

    def chunks(self, order: list[int], size: int, max_tokens: int = 0) -> list[list[int]]:
        """`order` cut, without reordering, into chunks of `size` sequences, or (`max_tokens` > 0)
        into chunks of at most `max_tokens` tokens (a longer sequence is a chunk of its own)."""
        if not max_tokens:
            return [order[s : s + size] for s in range(0, len(order), size)]
        out: list[list[int]] = []
        used = 0
        for i in order:
            if not out or used + self.length(i) > max_tokens:
                out.append([])
                used = 0
            out[-1].append(i)
            used += self.length(i)
        return out

    def collate(
        self, idx: list[int], pad_id: int, device: torch.device, *, packed: bool = False
    ) -> dict[str, torch.Tensor]:
        """Model inputs for the sequences `idx` and their per-token values in the response layout.

        Model inputs: padded (`pad_sequences`: input_ids/attention_mask [b, L]) or packed
        (`pack_sequences`: input_ids/position_ids [1, L], no attention mask: positions restarting
        at 0 mark the sequence boundaries). Response layout, the same for both: `index` [b, T] (T the
        longest response) holds the flat position in the model's [rows * (L-1)] logprob output that
        scores each response token, `resp_mask` [b, T] marks real tokens, and every per-token value
        present (sample/old/ref log-probs, ResRL weights) is [b, T]; plus rewards and positive [b].
        `positions` [M] (M response tokens) is `index` at the real tokens, sequence by sequence:
        the only rows the LM head needs (`forward_logprobs(..., positions=...)`, then
        `responses_from_rows` back to [b, T]).
        """
        prompts = [self.prompt_ids[i] for i in idx]
        responses = [self.response_ids[i] for i in idx]
        if packed:
            ids_RL, pos_RL, starts = pack_sequences(prompts, responses, pad_id)
            out = {"input_ids": ids_RL, "position_ids": pos_RL}
        else:
            ids_RL, mask_RL, _ = pad_sequences(prompts, responses, pad_id)
            width = ids_RL.shape[1] - 1
            starts = [row * width + len(p) - 1 for row, p in enumerate(prompts)]
            out = {"input_ids": ids_RL, "attention_mask": mask_RL}
        lengths = torch.tensor([len(r) for r in responses])
        t_max = max(int(lengths.max()), 1)
        offsets_T = torch.arange(t_max)
        resp_bT = offsets_T[None, :] < lengths[:, None]
        out["resp_mask"] = resp_bT
        out["index"] = torch.where(resp_bT, torch.tensor(starts)[:, None] + offsets_T, 0)
        out["positions"] = out["index"][resp_bT]
        values = {"sample_logprob": self.sample_logprob, **self.token_values}
        for name, per_seq in values.items():
            t_bT = torch.zeros(len(idx), t_max, dtype=torch.float32)
            for row, i in enumerate(idx):
                t_bT[row, : len(per_seq[i])] = per_seq[i]
            out[name] = t_bT
        out["rewards"] = self.rewards[idx]
        out["positive"] = self.positive[idx]
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def responses_of(values_RT: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """A model output in the logprob layout ([rows, L-1] or [rows, L-1, D]) gathered into the
    response layout of `collate` ([b, T] or [b, T, D]); differentiable."""
    flat = values_RT.reshape(-1, *values_RT.shape[2:])
    return flat[t["index"]]


def responses_from_rows(values_M: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Values of the response rows only ([M] or [M, D], in the order of collate's `positions`)
    placed into the response layout [b, T] (or [b, T, D]), 0 at padding; differentiable."""
    mask_bT = t["resp_mask"]
    if values_M.shape[0] != t["positions"].shape[0]:
        raise ValueError(
            f"values have {values_M.shape[0]} rows but the micro-batch has {t['positions'].shape[0]} "
            "response tokens"
        )
    out = values_M.new_zeros(*mask_bT.shape, *values_M.shape[1:])
    out[mask_bT] = values_M
    return out


def pack_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All sequences concatenated into one row: input_ids and position_ids [1, L] (positions restart
    at 0 for each sequence, which is how transformers' attention keeps packed sequences apart), and
    the flat logprob-layout position of each sequence's first response token."""
    ids: list[int] = []
    pos: list[int] = []
    starts = []
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"sequence {row} has an empty prompt; every prompt needs at least one token")
        starts.append(len(ids) + len(p) - 1)
        ids += p + r
        pos += range(len(p) + len(r))
    if len(ids) < 2:
        ids, pos = ids + [pad_id], pos + [0]
    return torch.tensor([ids]), torch.tensor([pos]), starts


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


def balance_groups(tokens: list[int], groups: list[int], ranks: int) -> list[list[int]]:
    """Split `groups` (positions into `tokens`, the token count of each prompt group) into `ranks`
    lists of equal length whose token sums are as even as a greedy pass makes them: largest group
    first, each to the rank with the fewest tokens that still has room (ties: the lower rank).
    Every rank must run the same number of optimizer steps, hence equal counts. Each list keeps
    the order the groups had in `groups`; deterministic, so every rank computes the same split."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if len(groups) % ranks:
        raise ValueError(f"{len(groups)} groups cannot be split evenly over {ranks} ranks")
    if ranks == 1:
        return [list(groups)]
    room = len(groups) // ranks
    load = [0] * ranks
    members: list[list[int]] = [[] for _ in range(ranks)]
    position = {g: k for k, g in enumerate(groups)}
    for g in sorted(groups, key=lambda g: (-tokens[g], position[g])):
        r = min((r for r in range(ranks) if len(members[r]) < room), key=lambda r: (load[r], r))
        members[r].append(g)
        load[r] += tokens[g]
    return [sorted(m, key=position.__getitem__) for m in members]
