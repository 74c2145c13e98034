"""
The paper's rule-based ranking rewards (ELVA, Section 3.4) and the GRPO pieces built on them, as
pure functions, in the paper's order. (The study's own rewards: study/rewards.py.)

    pytest -k reward        # the hand-computed cases in test_elva.py

Conventions: `scores` are cosine similarities [..., C], the positive at index 0 and the negatives at
1..C-1; every function is vectorised over the leading dimensions (in training (B, G, C): B queries x
G rollouts). Nothing here takes gradients: as in the paper (and UME-R1) the rewards are computed
from the rollout's scores without gradient, and GRPO's gradient flows only through the
log-probabilities of the sampled summary tokens.

Choices the paper leaves open, and ours (each a flag of train.py; the README's table of choices):
- log base: natural log.
- ties: a negative scoring *equal* to the positive ranks above it, so ties never reward the
  positive: a collapsed model (all scores equal) gets the worst rank, not the best.
- delta = 0.05 (DEFAULT_DELTA) and gamma = auto_gamma(C), the rule that scales with the candidate
  count C and keeps R_Rank falling with the positive's rank (a larger gamma is refused).
"""

from __future__ import annotations

import math

import torch

# alpha and epsilon: R_total's weights, the paper's best pair (Table 4: (0.4, 0.6), 58.7 on M-BEIR).
ALPHA, EPSILON = 0.4, 0.6

# delta: R_Margin's margin in cosine units. Small, because a margin few rollouts ever clear gives
# the whole group R_Margin = 0 and no signal; 0.05 is about the gap a trained model leaves between a
# positive and its one-grain near miss in GrainWorld.
DEFAULT_DELTA = 0.05


def ordered_gamma_limit(n_candidates: int) -> float:
    """The largest gamma under which R_Rank falls with the positive's rank at equal scores s > 0.
    There the negatives fill every rank but r, so
        R(r) - R(r + 1) = s * [1/(1 + ln r) - 1/(1 + ln(r + 1)) - gamma * ln((r + 1) / r)],
    and the order holds at every r < C while gamma stays below the bracket's bound. C = 5: 0.160,
    C = 9: 0.102, the paper's C = 101: 0.032. (At equal scores s < 0 the paper's positive term
    itself pays for a lower rank, whatever gamma.)"""
    if n_candidates < 2:
        raise ValueError(f"a ranking needs C >= 2 candidates, got {n_candidates}")
    return min((1 / (1 + math.log(r)) - 1 / (1 + math.log(r + 1))) / math.log((r + 1) / r)
               for r in range(1, n_candidates))


def auto_gamma(n_candidates: int) -> float:
    """gamma = 1 / sum_{k=2}^{C} |ln k - 1|, capped at half of ordered_gamma_limit(C).

    The first part makes the negative term's weights gamma * |ln k - 1| sum to one whatever the
    candidate count C, so it stays comparable to the positive term s_(r) / (1 + ln r) <= 1 (a
    fixed gamma 0.2 at C = 33 weighs the negatives 10.7 against 1). Alone it inverts the reward
    at few candidates: at C = 5 it pays more for the positive ranked last than first. The cap
    keeps R_Rank falling with the positive's rank at every C. C = 5: 0.080; C = 9: 0.051;
    C = 33: 0.0186; the paper's C = 101: 0.0037 (the cap acts for C <= 25)."""
    if n_candidates < 2:
        raise ValueError(f"auto_gamma needs C >= 2 candidates, got {n_candidates}")
    spread = 1.0 / sum(abs(math.log(k) - 1.0) for k in range(2, n_candidates + 1))
    return min(spread, ordered_gamma_limit(n_candidates) / 2)


def _check(scores: torch.Tensor):
    if scores.dim() < 1 or scores.shape[-1] < 2:
        raise ValueError(f"scores must have shape [..., C] with C >= 2 (a positive and a "
                         f"negative), got {tuple(scores.shape)}")


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """scores [R, C] -> int64 1-based ranks, best first; ties by index (the earlier ranks first);
    NaN last (NaNs among themselves by index). A stable sort keeps tied elements in index order,
    a second stable sort moves the NaNs to the end. (kernels.cosine_ranks gives the same ranks on
    a GPU.)"""
    nan = torch.isnan(scores)
    key = scores.masked_fill(nan, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices                 # (R, C)
    nan_last = torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices
    order = order.gather(-1, nan_last)
    ranks = torch.empty_like(order)
    ar = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, ar)


def ranks_with_positive_last(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the positive's rank [...], the negatives' ranks [..., C-1]), 1-based, in one ranked list.

    descending_ranks breaks ties by index (the earlier index first). Moving the positive to the last
    column therefore gives exactly our pessimistic rule: r = 1 + #{negatives with s >= s_0}."""
    _check(scores)
    lead = scores.shape[:-1]
    moved = torch.cat([scores[..., 1:], scores[..., :1]], dim=-1)
    moved = moved.reshape(-1, scores.shape[-1]).float().contiguous()                       # (R, C)
    ranks = descending_ranks(moved).reshape(*lead, -1)                                    # (..., C)
    return ranks[..., -1], ranks[..., :-1]


def margin_reward(scores: torch.Tensor, delta: float = DEFAULT_DELTA) -> torch.Tensor:
    """R_Margin = max(0, cos(q, c_p) - max_n cos(q, c_n) - delta)   (ELVA, Section 3.4)."""
    _check(scores)
    hardest = scores[..., 1:].max(dim=-1).values   # the hardest negative: the highest cosine
    return (scores[..., 0] - hardest - delta).clamp(min=0.0)


def ranking_reward(scores: torch.Tensor, gamma: float | None = None, return_rank: bool = False,
                   ranks: torch.Tensor | None = None):
    """R_Rank = s_(r) * 1/(1 + ln r)  -  gamma * sum_{k != r} s_(k) * (ln k - 1)   (ELVA, Sec. 3.4).

    s_(k) is the score at rank k of the rollout's sorted list and r the positive's rank. The first
    term pays a high score for the positive and a place near the top. The second penalises a
    negative placed low (large k) more for keeping a high score, so near negatives may stay close
    while far ones are pushed away. Note ln k - 1 < 0 for k <= 2: the paper's formula *rewards* the
    negative at rank 2 (or 1) for scoring high. gamma None: auto_gamma(C). ranks [..., C]: the
    list's ranks by the same rule, if already computed (the rollout's kernel)."""
    if gamma is None:
        gamma = auto_gamma(scores.shape[-1])
    if ranks is None:
        r, neg_ranks = ranks_with_positive_last(scores)
    else:
        r, neg_ranks = ranks[..., 0], ranks[..., 1:]
    s_pos = scores[..., 0]
    pos_term = s_pos / (1.0 + torch.log(r.to(scores.dtype)))
    neg_term = (scores[..., 1:] * (torch.log(neg_ranks.to(scores.dtype)) - 1.0)).sum(-1)
    R = pos_term - gamma * neg_term
    return (R, r) if return_rank else R


def total_reward(scores: torch.Tensor, alpha: float = ALPHA, epsilon: float = EPSILON,
                 delta: float = DEFAULT_DELTA, gamma: float | None = None,
                 return_parts: bool = False, ranks: torch.Tensor | None = None):
    """R_total = alpha * R_Margin + epsilon * R_Rank, alpha 0.4, epsilon 0.6 (Sec. 3.4, Table 4).

    With return_parts, also {"margin": R_Margin, "rank": R_Rank, "pos_rank": r}, for the log."""
    R_margin = margin_reward(scores, delta)
    R_rank, r = ranking_reward(scores, gamma, return_rank=True, ranks=ranks)
    R = alpha * R_margin + epsilon * R_rank
    return (R, {"margin": R_margin, "rank": R_rank, "pos_rank": r}) if return_parts else R


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: rewards [B, G] -> (r - mean) / (std + eps) over each query's G rollouts.

    std is torch.std's default (N-1). A group whose rewards all tie gets zeros: no gradient from
    that query, which is why the train log reports the fraction of tied groups."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 rollouts per query, got "
                         f"{tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              beta: float = 0.2, n_tokens: float | None = None, norm: str = "token"):
    """The GRPO objective per summary token, averaged over all the batch's sampled tokens (norm
    "token", as DAPO and TRL's default) or over each summary's tokens first, then over the summaries
    (norm "sequence", GRPO as first published: a long summary weighs no more than a short one). The
    paper does not say which.

    logp, old_logp, ref_logp, mask: (S, T) for S sequences; advantages (S,): their rollouts'.
      ratio  = exp(logp - old_logp)                   (1 on the first update of an on-policy batch)
      L_clip = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
      KL     = exp(ref - logp) - (ref - logp) - 1     (the k3 estimator: >= 0, 0 where logp == ref)
      loss   = mean over tokens of (L_clip + beta * KL)
    n_tokens: the mean's denominator (tokens, or with norm "sequence" the summaries with a sampled
    token) when the batch is split over processes. On-policy (one update per rollout batch: the
    paper's setting) the ratio is exactly 1 and the clip never acts; it acts when a batch is reused.
    -> (loss, {"kl": mean KL, "pg": mean L_clip (the policy-gradient part), "clip_low": the fraction
    of tokens where the min takes the clipped term because the ratio fell below 1 - eps with A < 0,
    "clip_high": ... rose above 1 + eps with A > 0, "clip_frac": their sum}): the tokens whose
    gradient the clip removes (TRL's clip_ratio/low_mean and clip_ratio/high_mean)."""
    A = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * A
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A
    l_clip = -torch.minimum(unclipped, clipped)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1.0
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    if norm == "sequence":   # each summary's token mean, then the mean over summaries
        per_seq = ((l_clip + beta * kl) * m).sum(1) / m.sum(1).clamp(min=1.0)                 # (S,)
        n_seq = (m.sum(1) > 0).sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1.0)
        loss = per_seq.sum() / n_seq
    elif norm == "token":
        n = n if n_tokens is None else torch.tensor(max(n_tokens, 1.0), dtype=logp.dtype)
        loss = ((l_clip + beta * kl) * m).sum() / n
    else:
        raise ValueError(f"norm must be 'token' or 'sequence', got {norm!r}")
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_eps) & (A < 0)).to(m.dtype)
        high = ((ratio > 1.0 + clip_eps) & (A > 0)).to(m.dtype)
        clip_low, clip_high = (low * m).sum() / n, (high * m).sum() / n
        kl_mean = (kl * m).sum() / n
        pg_mean = (l_clip * m).sum() / n
    info = {"kl": kl_mean.detach(), "pg": pg_mean.detach(), "clip_low": clip_low,
            "clip_high": clip_high, "clip_frac": clip_low + clip_high}
    return loss, info
