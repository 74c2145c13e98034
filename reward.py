"""
The paper's rule-based ranking rewards (ELVA, Section 3.4) and the GRPO pieces built on
them, as pure functions, in the paper's order. (The study's own rewards: study/rewards.py.)

    pytest -k reward        # the hand-computed cases in tests/test_reward.py

Conventions: `scores` are cosine similarities [..., C], the positive at index 0, the
negatives at 1..C-1; every function is vectorised over the leading dimensions (in
training (B, G, C): B queries x G rollouts). Nothing here takes gradients: as in the
paper (and UME-R1) the rewards come from the rollout's scores without gradient; GRPO's
gradient flows only through the log-probabilities of the sampled summary tokens.

Choices the paper leaves open, and ours (each a flag of train.py; the README's table):
- log base: natural log.
- the tie rule, stated here once for the whole project: a negative scoring *equal* to the
  positive ranks above it. Ties never reward the positive, so a collapsed model (all
  scores equal) gets the worst rank, not the best. The kernels, the evaluation and
  Retriever.search rank by this rule.
- delta = 0.05 (DEFAULT_DELTA), and gamma = auto_gamma(C): it scales with the candidate
  count C and keeps R_Rank falling with the positive's rank (a larger gamma is refused).
"""

from __future__ import annotations

import math

import torch

# alpha and epsilon: R_total's weights, the paper's best pair (Table 4: 58.7 on M-BEIR).
ALPHA, EPSILON = 0.4, 0.6

# delta: R_Margin's margin in cosine units. Small: a margin few rollouts clear gives the
# whole group R_Margin = 0 and no signal; 0.05 is about the gap a trained model leaves
# between a positive and its one-grain near miss in GrainWorld.
DEFAULT_DELTA = 0.05


def ordered_gamma_limit(n_candidates: int) -> float:
    """The largest gamma under which R_Rank falls with the positive's rank at equal scores
    s > 0, where the negatives fill every rank but r:
        R(r) - R(r + 1) = s * [1/(1 + ln r) - 1/(1 + ln(r + 1)) - gamma * ln((r + 1) / r)].
    C = 5: 0.160; C = 9: 0.102; the paper's C = 101: 0.032. (At equal scores s < 0 the
    positive term itself pays for a lower rank, whatever gamma.)"""
    if n_candidates < 2:
        raise ValueError(f"a ranking needs C >= 2 candidates, got {n_candidates}")
    return min((1 / (1 + math.log(r)) - 1 / (1 + math.log(r + 1))) / math.log((r + 1) / r)
               for r in range(1, n_candidates))


def auto_gamma(n_candidates: int) -> float:
    """gamma = 1 / sum_{k=2}^{C} |ln k - 1|, capped at half of ordered_gamma_limit(C).

    The first part makes the negative term's weights sum to one at any candidate count C
    (a fixed gamma 0.2 at C = 33 weighs the negatives 10.7 against a positive term <= 1);
    alone it inverts the reward at C <= 6. C = 5: 0.080; C = 9: 0.051; C = 33: 0.0186;
    the paper's C = 101: 0.0037 (the cap acts for C <= 25)."""
    if n_candidates < 2:
        raise ValueError(f"auto_gamma needs C >= 2 candidates, got {n_candidates}")
    spread = 1.0 / sum(abs(math.log(k) - 1.0) for k in range(2, n_candidates + 1))
    return min(spread, ordered_gamma_limit(n_candidates) / 2)


def _check(scores: torch.Tensor):
    if scores.dim() < 1 or scores.shape[-1] < 2:
        raise ValueError(f"scores must have shape [..., C] with C >= 2 (a positive and a "
                         f"negative), got {tuple(scores.shape)}")


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """scores [R, C] -> int64 1-based ranks, best first; ties by index (the earlier first);
    NaN last. One stable sort keeps tied elements in index order, a second moves the NaNs
    to the end. (kernels.cosine_ranks gives the same ranks on a GPU.)"""
    nan = torch.isnan(scores)
    key = scores.masked_fill(nan, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices       # (R, C)
    nan_last = torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, stable=True)
    order = order.gather(-1, nan_last.indices)
    ranks = torch.empty_like(order)
    ar = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, ar)


def ranks_with_positive_last(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the positive's rank [...], the negatives' ranks [..., C-1]), 1-based, in one list.
    descending_ranks breaks ties by index, so moving the positive to the last column gives
    exactly the tie rule: r = 1 + #{negatives with s >= s_0}."""
    _check(scores)
    lead = scores.shape[:-1]
    moved = torch.cat([scores[..., 1:], scores[..., :1]], dim=-1)
    moved = moved.reshape(-1, scores.shape[-1]).float().contiguous()             # (R, C)
    ranks = descending_ranks(moved).reshape(*lead, -1)                           # (..., C)
    return ranks[..., -1], ranks[..., :-1]


def margin_reward(scores: torch.Tensor, delta: float = DEFAULT_DELTA) -> torch.Tensor:
    """R_Margin = max(0, cos(q, c_p) - max_n cos(q, c_n) - delta)   (ELVA, Section 3.4)."""
    _check(scores)
    hardest = scores[..., 1:].max(dim=-1).values   # the hardest negative: the highest cosine
    return (scores[..., 0] - hardest - delta).clamp(min=0.0)


def ranking_reward(scores: torch.Tensor, gamma: float | None = None,
                   return_rank: bool = False, ranks: torch.Tensor | None = None):
    """R_Rank = s_(r) / (1 + ln r)  -  gamma * sum_{k != r} s_(k) * (ln k - 1)   (Sec. 3.4)

    s_(k): the score at rank k of the rollout's sorted list; r: the positive's rank. The
    second term penalises a negative placed low (large k) more for keeping a high score;
    ln k - 1 < 0 for k <= 2, so it *rewards* the rank-2 negative for scoring high. gamma
    None: auto_gamma(C). ranks [..., C]: the list's ranks, if already computed."""
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
    """R_total = alpha * R_Margin + epsilon * R_Rank, alpha 0.4, epsilon 0.6 (Table 4).
    With return_parts, also {"margin": R_Margin, "rank": R_Rank, "pos_rank": r}."""
    R_margin = margin_reward(scores, delta)
    R_rank, r = ranking_reward(scores, gamma, return_rank=True, ranks=ranks)
    R = alpha * R_margin + epsilon * R_rank
    return (R, {"margin": R_margin, "rank": R_rank, "pos_rank": r}) if return_parts else R


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: rewards [B, G] -> (r - mean) / (std + eps) over each query's G
    rollouts, std as torch.std's default (N-1). A group whose rewards all tie gets zeros: no
    gradient from that query (the log's tied_groups)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 rollouts per query, got "
                         f"{tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              beta: float = 0.2, n_tokens: float | None = None, norm: str = "token"):
    """GRPO's objective on the sampled tokens (mask), for S sequences of T tokens:
      ratio  = exp(logp - old_logp)                 (1 on an on-policy batch's only update)
      L_clip = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
      KL     = exp(ref - logp) - (ref - logp) - 1   (k3: >= 0, 0 where logp == ref)
      loss   = the mean of L_clip + beta * KL over the batch's tokens (norm "token")
               or over each summary's tokens, then over summaries (norm "sequence")"""
    # advantages (S,): each sequence's rollout's. n_tokens: the mean's denominator when the
    # batch is split over processes. The paper does not say which mean: "token" is DAPO's and
    # TRL's default; "sequence" is GRPO as first published (a long summary weighs no more).
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
        per_seq = ((l_clip + beta * kl) * m).sum(1) / m.sum(1).clamp(min=1.0)       # (S,)
        n_seq = (m.sum(1) > 0).sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1.0)
        loss = per_seq.sum() / n_seq
    elif norm == "token":
        n = n if n_tokens is None else torch.tensor(max(n_tokens, 1.0), dtype=logp.dtype)
        loss = ((l_clip + beta * kl) * m).sum() / n
    else:
        raise ValueError(f"norm must be 'token' or 'sequence', got {norm!r}")
    # for the log: the mean KL and policy-gradient term, and the share of tokens whose
    # gradient the clip removes (TRL's clip_ratio/low_mean and clip_ratio/high_mean)
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_eps) & (A < 0)).to(m.dtype)
        high = ((ratio > 1.0 + clip_eps) & (A > 0)).to(m.dtype)
        clip_low, clip_high = (low * m).sum() / n, (high * m).sum() / n
        kl_mean = (kl * m).sum() / n
        pg_mean = (l_clip * m).sum() / n
    info = {"kl": kl_mean.detach(), "pg": pg_mean.detach(), "clip_low": clip_low,
            "clip_high": clip_high, "clip_frac": clip_low + clip_high}
    return loss, info
