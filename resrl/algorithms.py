"""Advantages, per-token objectives, the clipped surrogate loss and ResRL token weights.

The math is ALGORITHMS.md §2-§4, followed exactly; departures are named where they occur. All
functions take padded [B, T] response tensors (T = response positions) with a bool `mask` of valid
tokens, except `resrl_token_weights` and `PolicyTokenLoss` (the loss of `policy_loss` as a sum over
chunks of tokens, for the fused LM-head loss), which take the valid tokens flattened to [N].
"""

from __future__ import annotations

import torch

import kernels

ADVANTAGE_KINDS = ("grpo", "drgrpo", "reinforce")
OBJECTIVES = ("grpo", "psr", "nsr", "w_reinforce", "resrl", "ace")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
# Added to the group std before dividing (ALGORITHMS.md §2).
STD_EPS = 1e-6
# Bound on log-ratios before exp, so a stale or corrupted log-prob cannot overflow (§3).
LOG_RATIO_CLAMP = 20.0
_MASK64 = (1 << 64) - 1


def _check_tensor(name: str, t: object, ndim: int, kinds: str) -> torch.Tensor:
    """kinds: 'f' floating, 'i' integer, 'b' bool (any combination)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    ok = (
        ("f" in kinds and t.is_floating_point())
        or ("b" in kinds and t.dtype == torch.bool)
        or ("i" in kinds and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool)
    )
    if not ok:
        wanted = {"f": "floating", "i": "integer", "b": "bool"}
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {' or '.join(wanted[k] for k in kinds)}")
    return t


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {choices}")
    return value  # type: ignore[return-value]


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not float(value) > 0:
        raise ValueError(f"{name} must be > 0 (or None to use this batch's own count), got {value}")


# --------------------------------------------------------------------------- §2 advantages


def group_advantages(
    rewards: torch.Tensor,  # [B] float
    group_ids: torch.Tensor,  # [B] int
    kind: str = "grpo",
    positive: torch.Tensor | None = None,  # [B] bool
) -> torch.Tensor:
    """Sequence-level advantage of each response from its group's rewards: [B] fp32 (§2).

    - grpo: (r - mean_g r) / (std_g r + 1e-6), std unbiased (N - 1); a group of one gets 0.
    - drgrpo: r - mean_g r.
    - reinforce: +1 for positives, -1 for negatives, no baseline. `positive` None means
      `rewards > 0` (ALGORITHMS.md §1: a response is positive iff its reward is > 0).

    `group_ids` are any integers (not necessarily dense or sorted). Groups are reduced with
    `index_add_` in float64, never a Python loop over groups.
    """
    _check_tensor("rewards", rewards, 1, "f")
    _check_tensor("group_ids", group_ids, 1, "i")
    _check_choice("kind", kind, ADVANTAGE_KINDS)
    b = rewards.shape[0]
    if group_ids.shape[0] != b:
        raise ValueError(f"group_ids has {group_ids.shape[0]} entries but rewards has {b}")
    if positive is not None:
        _check_tensor("positive", positive, 1, "b")
        if positive.shape[0] != b:
            raise ValueError(f"positive has {positive.shape[0]} entries but rewards has {b}")
    if b == 0:
        return rewards.new_zeros(0, dtype=torch.float32)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contains NaN or Inf; every reward must be a finite number")
    if kind == "reinforce":
        pos_B = rewards > 0 if positive is None else positive
        return torch.where(pos_B, 1.0, -1.0).to(torch.float32)

    uniq_G, inv_B = torch.unique(group_ids, return_inverse=True)
    r_B = rewards.double()
    zeros_G = r_B.new_zeros(uniq_G.shape[0])
    count_G = zeros_G.index_add(0, inv_B, torch.ones_like(r_B))
    mean_G = zeros_G.index_add(0, inv_B, r_B) / count_G
    dev_B = r_B - mean_G[inv_B]
    if kind == "drgrpo":
        return dev_B.float()
    var_G = zeros_G.index_add(0, inv_B, dev_B * dev_B) / (count_G - 1).clamp_min(1)
    adv_B = dev_B / (var_G.sqrt()[inv_B] + STD_EPS)
    return torch.where(count_G[inv_B] > 1, adv_B, 0.0).float()


# --------------------------------------------------------------------------- §3 objectives


def rarity(reward_class: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """R²PO's rarity (ALGORITHMS.md §5): 1 / the number of responses of the same group whose reward
    class equals this one's ([B] fp32). `reward_class`: [B] float keys compared exactly (round them
    first; a length-scaled reward is continuous, so pass the reward before scaling)."""
    _check_tensor("reward_class", reward_class, 1, "f")
    _check_tensor("group_ids", group_ids, 1, "i")
    if group_ids.shape[0] != reward_class.shape[0]:
        raise ValueError(
            f"group_ids has {group_ids.shape[0]} entries but reward_class has {reward_class.shape[0]}"
        )
    if reward_class.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    if not bool(torch.isfinite(reward_class).all()):
        raise ValueError("reward_class contains NaN or Inf; every reward must be a finite number")
    pairs = torch.stack([group_ids.double(), reward_class.double()], 1)
    _, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].float()


def token_advantages(
    objective: str,
    seq_adv: torch.Tensor,  # [B] float
    positive: torch.Tensor,  # [B] bool
    mask: torch.Tensor,  # [B, T] bool
    resrl_weight: torch.Tensor | None = None,  # [B, T] float
    *,
    pos_scale: float = 0.1,
    w_lambda: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantage of each objective (ALGORITHMS.md §3 table): (adv [B, T] fp32, mask [B, T] bool).

    - grpo: seq_adv on every valid token.
    - ace: the same (its sequence advantages were rescaled by `ace_advantages` beforehand).
    - psr: +1 on positives; negative responses dropped from the mask.
    - nsr: -1 on negatives; positive responses dropped from the mask.
    - w_reinforce: +w_lambda on positives, -1 on negatives.
    - resrl: pos_scale * seq_adv on positives, resrl_weight * seq_adv on negatives
      (`resrl_weight` from `resrl_token_weights`, required; it is ignored by other objectives).

    psr/nsr/w_reinforce use the fixed +-1 / +lambda values of the table, not `seq_adv`. Tokens
    outside the returned mask have advantage 0.
    """
    _check_choice("objective", objective, OBJECTIVES)
    _check_tensor("seq_adv", seq_adv, 1, "f")
    _check_tensor("positive", positive, 1, "b")
    _check_tensor("mask", mask, 2, "b")
    b = mask.shape[0]
    if seq_adv.shape[0] != b or positive.shape[0] != b:
        raise ValueError(
            f"seq_adv ({seq_adv.shape[0]}) and positive ({positive.shape[0]}) need one entry per row of "
            f"mask {tuple(mask.shape)}"
        )
    pos_B1 = positive[:, None]
    adv_B1 = seq_adv.float()[:, None]
    if objective in ("grpo", "ace"):
        adv_BT = adv_B1.expand(mask.shape)
    elif objective == "psr":
        adv_BT, mask = torch.ones(mask.shape, device=mask.device), mask & pos_B1
    elif objective == "nsr":
        adv_BT, mask = torch.full(mask.shape, -1.0, device=mask.device), mask & ~pos_B1
    elif objective == "w_reinforce":
        adv_BT = torch.where(pos_B1, float(w_lambda), -1.0).expand(mask.shape)
    else:
        if resrl_weight is None:
            raise ValueError("objective='resrl' needs resrl_weight [B, T] (from resrl_token_weights)")
        _check_tensor("resrl_weight", resrl_weight, 2, "f")
        if resrl_weight.shape != mask.shape:
            raise ValueError(
                f"resrl_weight has shape {tuple(resrl_weight.shape)}; expected mask's {tuple(mask.shape)}"
            )
        adv_BT = torch.where(pos_B1, float(pos_scale) * adv_B1, resrl_weight.float() * adv_B1)
    return torch.where(mask, adv_BT, 0.0).float(), mask


def ace_advantages(
    seq_adv: torch.Tensor,  # [B] float
    seq_logprob: torch.Tensor,  # [B] float, log pi_theta(y_i | x): sum over the response
    seq_ref_logprob: torch.Tensor,  # [B] float, log pi_ref(y_i | x)
    *,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ACE (ALGORITHMS.md §6): negative advantages scaled up for overconfident errors.

    c_i = log pi_theta(y_i|x) - log pi_ref(y_i|x); A~_i = A_i (1 + alpha softplus(c_i)) where
    A_i < 0, A_i elsewhere. Returns (A~ [B] fp32, c [B] fp32). The log-probs carry no gradient.
    """
    _check_tensor("seq_adv", seq_adv, 1, "f")
    _check_tensor("seq_logprob", seq_logprob, 1, "f")
    _check_tensor("seq_ref_logprob", seq_ref_logprob, 1, "f")
    if not seq_adv.shape == seq_logprob.shape == seq_ref_logprob.shape:
        raise ValueError(
            f"seq_adv {tuple(seq_adv.shape)}, seq_logprob {tuple(seq_logprob.shape)} and seq_ref_logprob "
            f"{tuple(seq_ref_logprob.shape)} need the same length"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    shift_B = (seq_logprob.detach().double() - seq_ref_logprob.detach().double()).float()
    if not bool(torch.isfinite(shift_B).all()):
        raise ValueError("ACE confidence shift is not finite: a log-prob is NaN or infinite")
    scale_B = 1.0 + float(alpha) * torch.nn.functional.softplus(shift_B)
    adv_B = seq_adv.float()
    return torch.where(adv_B < 0, adv_B * scale_B, adv_B), shift_B


# --------------------------------------------------------------------------- clipped surrogate


def truncated_is(
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    sample_logprob_BT: torch.Tensor,
    old_logprob_BT: torch.Tensor,
    *,
    cap: float,
) -> tuple[torch.Tensor, float]:
    """Truncated importance sampling for the gap between the engine that sampled the tokens and
    the trainer: each token's advantage times min(pi_old / pi_engine, cap) (no gradient), pi_old
    the trainer's log-prob before this step's updates. Returns (advantage [B, T], sum of the
    weights over valid tokens, for the mean metric)."""
    log_w = (old_logprob_BT.detach() - sample_logprob_BT).clamp(max=20.0)
    w_BT = torch.where(mask_BT, log_w.exp().clamp(max=cap), 0.0)
    return adv_BT * w_BT, float(w_BT.sum())


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimator of KL(pi_theta || pi_ref) from samples of pi_theta, same shape as inputs.

    k1 = log pi - log pi_ref; k2 = (log pi - log pi_ref)^2 / 2; k3 (low variance, Schulman) =
    exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1. The log-ratio is clamped to +-20 first.
    """
    _check_choice("kl_kind", kind, KL_KINDS)
    log_ratio = (logprob.float() - ref_logprob.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio * log_ratio
    return torch.exp(-log_ratio) + log_ratio - 1.0


def aggregation_weights(
    mask_BT: torch.Tensor,
    agg: str,
    token_count: float | torch.Tensor,
    seq_count: float | torch.Tensor,
    norm_len: float,
) -> torch.Tensor:
    """Each token's weight in the batch-level aggregate: [B, T] fp32, 0 outside the mask, such that
    the aggregate of per-token values l is sum(weight * l) (divisors are global, see policy_loss):
    token-mean 1/token_count; seq-mean-token-mean 1/(n_i seq_count), n_i the valid tokens of row i;
    seq-mean-token-sum-norm 1/(norm_len seq_count)."""
    _check_choice("agg", agg, AGG_MODES)
    ones_BT = mask_BT.float()
    if agg == "token-mean":
        return ones_BT / token_count
    if agg == "seq-mean-token-mean":
        # Rows without valid tokens contribute 0 (and are not counted in seq_count).
        return ones_BT / (mask_BT.sum(1, keepdim=True).clamp_min(1) * seq_count)
    return ones_BT / (norm_len * seq_count)


def _aggregate(value_BT: torch.Tensor, weight_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum of this micro-batch's share of the batch-level aggregate (`aggregation_weights`)."""
    return (torch.where(mask_BT, value_BT, 0.0) * weight_BT).sum()


def _check_loss_settings(eps_low: float, eps_high: float, dual_clip: float | None, kl_kind: str) -> None:
    _check_choice("kl_kind", kl_kind, KL_KINDS)
    if not (0.0 <= eps_low < 1.0) or not eps_high >= 0.0:
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0; got eps_low={eps_low}, eps_high={eps_high}"
        )
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def _clipped_surrogate(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> dict[str, torch.Tensor]:
    """Per-token clipped surrogate with dual clip (§3): the loss and what the metrics read."""
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    neg = adv < 0
    dual = torch.zeros_like(neg)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = neg & (loss > cap)
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
    return {
        "loss": loss,
        "ratio": ratio,
        "unclipped": unclipped,
        "clipped": clipped,
        "neg": neg,
        "dual": dual,
    }


def policy_loss(
    logprob: torch.Tensor,  # [B, T]
    old_logprob: torch.Tensor | None,  # [B, T]
    adv: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] bool
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    token_count: float | None = None,
    seq_count: float | None = None,
    norm_len: int | None = None,
    ref_logprob: torch.Tensor | None = None,  # [B, T]
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: torch.Tensor | None = None,  # [B, T]
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with dual clip, optional KL and entropy terms: (loss scalar, metrics).

    Per valid token (ALGORITHMS.md §3): rho = exp(clamp(logprob - old_logprob, -20, 20));
    l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)); for A < 0, l = min(l, -A c) with
    c = dual_clip (None disables it). `old_logprob` None means on-policy: rho = exp(lp - lp.detach()),
    exactly 1 with the gradient of lp.

    Aggregation divides by a batch-level constant passed in, so the sum of the losses of any
    split into micro-batches equals the full-batch loss (and so does the gradient):
      - token-mean: sum(l m) / token_count (global valid-token count).
      - seq-mean-token-mean: sum_i (sum_t l m / sum_t m) / seq_count (global number of sequences
        with >= 1 valid token).
      - seq-mean-token-sum-norm (Dr.GRPO): sum(l m) / (norm_len * seq_count), norm_len a constant
        such as the max response length; the mean over sequences of the length-normalized sums.
    A divisor left None is computed from this batch (right only when it is the whole batch);
    norm_len None means T. The KL term (kl_coef * agg(k)) and the entropy bonus
    (-entropy_coef * agg(H)) use the same aggregation.

    Metrics (local to this call, means over its valid tokens, as floats from one host sync):
    pg_loss, pg_clipfrac (clipped branch active), pg_clipfrac_high (A > 0, rho > 1 + eps_high),
    pg_clipfrac_low (A < 0, rho < 1 - eps_low), dual_clipfrac, ratio_mean/min/max, approx_kl
    (k3 of old vs current), and kl / entropy when given, plus valid_tokens.
    """
    for name, t in (("logprob", logprob), ("adv", adv)):
        _check_tensor(name, t, 2, "f")
    _check_tensor("mask", mask, 2, "b")
    shape = logprob.shape
    named = {
        "old_logprob": old_logprob,
        "adv": adv,
        "mask": mask,
        "ref_logprob": ref_logprob,
        "entropy": entropy,
    }
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected logprob's {tuple(shape)}")
    _check_choice("agg", agg, AGG_MODES)
    _check_loss_settings(eps_low, eps_high, dual_clip, kl_kind)
    for name, value in (("token_count", token_count), ("seq_count", seq_count), ("norm_len", norm_len)):
        _check_positive(name, value)
    if kl_coef != 0.0 and ref_logprob is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprob [B, T]")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy [B, T]")

    # Zero the padding first: a non-finite value there would turn its zero gradient into NaN (0 * inf).
    lp_BT = torch.where(mask, logprob.float(), 0.0)
    old_BT = lp_BT.detach() if old_logprob is None else torch.where(mask, old_logprob.float(), 0.0)
    adv_BT = torch.where(mask, adv.float(), 0.0)
    terms = _clipped_surrogate(lp_BT, old_BT, adv_BT, eps_low, eps_high, dual_clip)
    ratio_BT, loss_BT, neg_BT, dual_BT = terms["ratio"], terms["loss"], terms["neg"], terms["dual"]

    if token_count is None:
        token_count = mask.sum().clamp_min(1)
    if seq_count is None:
        seq_count = mask.any(1).sum().clamp_min(1)
    norm = float(shape[1] if norm_len is None else norm_len)
    weight_BT = aggregation_weights(mask, agg, token_count, seq_count, norm)
    pg_loss = _aggregate(loss_BT, weight_BT, mask)
    loss = pg_loss

    n_valid = mask.sum()
    denom = n_valid.clamp_min(1)

    def local_mean(x_BT: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x_BT.detach().float(), 0.0).sum() / denom

    with torch.no_grad():
        ratio_d = ratio_BT.detach()
        if mask.numel() > 0:
            ratio_max = torch.where(mask, ratio_d, -torch.inf).max()
            ratio_min = torch.where(mask, ratio_d, torch.inf).min()
        else:
            ratio_max = ratio_min = ratio_d.new_zeros(())
        metric_tensors = {
            "pg_loss": pg_loss.detach(),
            "pg_clipfrac": local_mean((terms["clipped"] > terms["unclipped"]).float()),
            "pg_clipfrac_high": local_mean(((adv_BT > 0) & (ratio_d > 1.0 + eps_high)).float()),
            "pg_clipfrac_low": local_mean((neg_BT & (ratio_d < 1.0 - eps_low)).float()),
            "dual_clipfrac": local_mean(dual_BT.float()),
            "ratio_mean": local_mean(ratio_d),
            "ratio_max": ratio_max,
            "ratio_min": ratio_min,
            "approx_kl": local_mean(kl_penalty(lp_BT.detach(), old_BT, "k3")),
        }
    if ref_logprob is not None:
        kl_BT = kl_penalty(lp_BT, torch.where(mask, ref_logprob.float(), 0.0), kl_kind)
        if kl_coef != 0.0:
            loss = loss + kl_coef * _aggregate(kl_BT, weight_BT, mask)
        metric_tensors["kl"] = local_mean(kl_BT)
    if entropy is not None:
        entropy = torch.where(mask, entropy.float(), 0.0)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * _aggregate(entropy, weight_BT, mask)
        metric_tensors["entropy"] = local_mean(entropy)
    metric_tensors["valid_tokens"] = n_valid.float()
    values = torch.stack([v.reshape(()).float() for v in metric_tensors.values()]).tolist()
    metrics = dict(zip(metric_tensors, values, strict=True))
    if metrics["valid_tokens"] == 0:
        # No valid token: the masked max/min are +-inf, not a ratio.
        metrics["ratio_max"] = metrics["ratio_min"] = 0.0
    return loss, metrics


class PolicyTokenLoss:
    """`policy_loss` as a sum over tokens, for `kernels.linear_logprob_loss`: called on a chunk of
    the M response tokens of a micro-batch (their log-probs and entropies, `rows` the chunk's
    slice), it returns that chunk's share of the loss, so the chunks' values add up to the loss
    `policy_loss` gives on the same tokens (tested).

    Per token: weight * (l + kl_coef k - entropy_coef H), l the clipped surrogate with dual clip
    (§3), k the KL estimator against `ref_logprob`, H the entropy, and weight the token's share of
    the aggregate (`aggregation_weights`: the global divisors fold in here, and 0 drops a token).
    With `tis_cap` > 0 the advantage is first scaled by min(pi_old / pi_engine, cap)
    (`truncated_is`; pi_old the current log-prob, detached, when `old_logprob` is None).

    All per-token inputs are flat [M] (the response layout at `resp_mask`, sequence by sequence).
    """

    def __init__(
        self,
        adv: torch.Tensor,  # [M]
        weight: torch.Tensor,  # [M], from aggregation_weights
        *,
        old_logprob: torch.Tensor | None = None,  # [M]; None: on-policy
        ref_logprob: torch.Tensor | None = None,  # [M]
        sample_logprob: torch.Tensor | None = None,  # [M], needed when tis_cap > 0
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        kl_coef: float = 0.0,
        kl_kind: str = "k3",
        entropy_coef: float = 0.0,
        tis_cap: float = 0.0,
    ) -> None:
        _check_tensor("adv", adv, 1, "f")
        _check_tensor("weight", weight, 1, "f")
        m = adv.shape[0]
        named = {"weight": weight, "old_logprob": old_logprob, "ref_logprob": ref_logprob}
        named["sample_logprob"] = sample_logprob
        for name, t in named.items():
            if t is not None:
                _check_tensor(name, t, 1, "f")
                if t.shape[0] != m:
                    raise ValueError(f"{name} has {t.shape[0]} entries; expected adv's {m}")
        _check_loss_settings(eps_low, eps_high, dual_clip, kl_kind)
        if kl_coef != 0.0 and ref_logprob is None:
            raise ValueError(f"kl_coef={kl_coef} needs ref_logprob [M]")
        if tis_cap < 0 or (tis_cap > 0 and sample_logprob is None):
            raise ValueError(f"tis_cap={tis_cap} must be >= 0 and needs sample_logprob [M] when > 0")
        self.adv, self.weight = adv.float(), weight.float()
        self.old = None if old_logprob is None else old_logprob.float()
        self.ref = None if ref_logprob is None else ref_logprob.float()
        self.sample = None if sample_logprob is None else sample_logprob.float()
        self.eps_low, self.eps_high, self.dual_clip = eps_low, eps_high, dual_clip
        self.kl_coef, self.kl_kind, self.entropy_coef, self.tis_cap = kl_coef, kl_kind, entropy_coef, tis_cap

    def __call__(self, logprob_C: torch.Tensor, entropy_C: torch.Tensor | None, rows: slice) -> torch.Tensor:
        if self.entropy_coef != 0.0 and entropy_C is None:
            raise ValueError(f"entropy_coef={self.entropy_coef} needs the entropies (with_entropy=True)")
        # float64 stays float64 (a ground truth in tests); lower precisions compute in fp32.
        lp = logprob_C.to(torch.promote_types(logprob_C.dtype, torch.float32))
        old = lp.detach() if self.old is None else self.old[rows]
        adv = self.adv[rows]
        if self.tis_cap > 0:
            log_w = (old.detach() - self.sample[rows]).clamp(max=20.0)
            adv = adv * log_w.exp().clamp(max=self.tis_cap)
        loss = _clipped_surrogate(lp, old, adv, self.eps_low, self.eps_high, self.dual_clip)["loss"]
        if self.kl_coef != 0.0:
            loss = loss + self.kl_coef * kl_penalty(lp, self.ref[rows], self.kl_kind)
        if self.entropy_coef != 0.0:
            loss = loss - self.entropy_coef * entropy_C.to(lp.dtype)
        return (loss * self.weight[rows]).sum()


# --------------------------------------------------------------------------- §4 ResRL weights


def group_seed(seed: int, group_id: int) -> int:
    """63-bit generator seed for one group: splitmix64 of (seed, group id), independent of batch order."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(group_id)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def resrl_token_weights(
    sub_hidden_ND: torch.Tensor,
    token_group: torch.Tensor,  # [N] int
    token_positive: torch.Tensor,  # [N] bool
    *,
    rank: int = 64,
    max_tokens: int = 4096,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_weight: float = 0.1,
    min_pos_tokens: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """ResRL weight of every valid response token (ALGORITHMS.md §4): weight [N] fp32.

    Args:
        sub_hidden_ND: [N, D] detached hidden states of the valid response tokens of the whole
            rollout batch (penultimate layer by default), any float dtype the kernels accept.
        token_group: [N] prompt-group id of each token (any integers).
        token_positive: [N] whether the token's response is positive.

    For each group with >= min_pos_tokens positive tokens and >= 1 negative token, a basis is built
    from its positive tokens (`kernels.subspace_basis`, randomized PCA with a CPU generator seeded
    by `group_seed(seed, group id)`, so weights are reproducible and do not depend on where the
    group sits in the batch; the pool keeps the tokens' order within the group). All bases are
    zero-padded to a common k and stacked; one `subspace_residual` call gives the distances of
    every negative token of those groups and one `residual_weights` call their weights. Positive
    tokens and tokens of skipped groups get 1.

    Departure from the reference code (on purpose, §4): groups are complete here, never the
    fragments that land in one training micro-batch.
    """
    _check_tensor("sub_hidden_ND", sub_hidden_ND, 2, "f")
    _check_tensor("token_group", token_group, 1, "i")
    _check_tensor("token_positive", token_positive, 1, "b")
    n, _ = sub_hidden_ND.shape
    if token_group.shape[0] != n or token_positive.shape[0] != n:
        raise ValueError(
            f"token_group ({token_group.shape[0]}) and token_positive ({token_positive.shape[0]}) need "
            f"one entry per row of sub_hidden_ND ({n})"
        )
    if isinstance(min_pos_tokens, bool) or not isinstance(min_pos_tokens, int) or min_pos_tokens < 2:
        raise ValueError(
            f"min_pos_tokens must be an int >= 2 (a basis needs two tokens), got {min_pos_tokens!r}"
        )
    device = sub_hidden_ND.device
    weight_N = torch.ones(n, dtype=torch.float32, device=device)
    if n == 0:
        return weight_N

    uniq_G, inv_N = torch.unique(token_group.long(), return_inverse=True)
    g = uniq_G.shape[0]
    # Sort once by (group, positive first), stable: each group's positive tokens are one slice.
    key_N = inv_N * 2 + (~token_positive).long()
    order_N = torch.argsort(key_N, stable=True)
    n_pos_G = torch.zeros(g, dtype=torch.long, device=device).index_add_(0, inv_N, token_positive.long())
    n_all_G = torch.bincount(inv_N, minlength=g)
    starts_G = torch.cumsum(n_all_G, 0) - n_all_G
    n_pos, n_all, starts, group_ids = (
        t.tolist() for t in (n_pos_G.cpu(), n_all_G.cpu(), starts_G.cpu(), uniq_G.cpu())
    )

    bases, means, basis_of_group = [], [], torch.full((g,), -1, dtype=torch.long)
    for gi in range(g):
        if n_pos[gi] < min_pos_tokens or n_all[gi] == n_pos[gi]:
            continue
        pos_idx = order_N[starts[gi] : starts[gi] + n_pos[gi]]
        gen = torch.Generator().manual_seed(group_seed(seed, group_ids[gi]))
        basis_DK, mean_D = kernels.subspace_basis(
            sub_hidden_ND[pos_idx], rank=rank, max_tokens=max_tokens, generator=gen
        )
        if basis_DK.shape[1] < 1:
            continue
        basis_of_group[gi] = len(bases)
        bases.append(basis_DK)
        means.append(mean_D)
    if not bases:
        return weight_N

    k_max = max(b.shape[1] for b in bases)
    basis_GDK = torch.stack([torch.nn.functional.pad(b, (0, k_max - b.shape[1])) for b in bases])
    mean_GD = torch.stack(means)
    basis_idx_N = basis_of_group.to(device)[inv_N]
    neg_N = ~token_positive & (basis_idx_N >= 0)
    neg_idx = neg_N.nonzero().squeeze(1)
    neg_group = basis_idx_N[neg_idx]
    dist = kernels.subspace_residual(sub_hidden_ND[neg_idx], basis_GDK, mean_GD, neg_group)
    w = kernels.residual_weights(
        dist,
        neg_group,
        torch.ones_like(neg_group, dtype=torch.bool),
        q_low=q_low,
        q_high=q_high,
        min_weight=min_weight,
    )
    weight_N[neg_idx] = w
    return weight_N
