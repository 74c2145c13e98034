"""
The paper's rule-based ranking rewards (PAPER.md, Section 3.4) and the GRPO pieces built on them, as pure functions.

    pytest -k reward        # the hand-computed cases in test_elva.py

Conventions: `scores` are cosine similarities of shape [..., C] with the positive at index 0 and the negatives at
1..C-1; every function is vectorised over the leading dimensions (in training: (B, G, C), B queries x G rollouts).
Nothing here needs gradients: as in the paper (and UME-R1), rewards are computed from the rollout's scores without
gradient, and GRPO's gradient flows only through the log-probabilities of the sampled summary tokens.

Choices the paper leaves open, and ours (README, "Choices the paper leaves open"):
- log base: natural log (DESIGN.md).
- ties: a negative scoring *equal* to the positive ranks above it, so ties never reward the positive: a collapsed
  model (all scores equal) gets the worst rank, not the best.
- delta = 0.05 and gamma = 0.2: see DEFAULT_DELTA / DEFAULT_GAMMA.
"""

from __future__ import annotations

import math

import torch

from kernels import descending_ranks

# delta: the margin of R_Margin in cosine units. Small, because a margin few rollouts ever clear gives R_Margin = 0
# for the whole group and no signal; 0.05 is about the gap a trained model leaves between a positive and its one-grain
# near miss in GrainWorld.
DEFAULT_DELTA = 0.05
# gamma: weight of R_Rank's negative term. The weights (ln k - 1) summed over the negatives' ranks 2..C are ~4.8 for
# our default C = 9 (8 negatives), so gamma = 0.2 keeps the negative term (~0.2 * 4.8 * typical score) comparable to
# the positive term s_(r) / (1 + ln r) <= 1. For the paper's 100 negatives the same rule gives gamma ~ 1/263.
DEFAULT_GAMMA = 0.2


def auto_gamma(n_candidates: int) -> float:
    """1 / sum_{k=2}^{C} (ln k - 1): the gamma that makes the negative term's weights sum to one."""
    return 1.0 / sum(math.log(k) - 1.0 for k in range(2, n_candidates + 1))


def _check(scores: torch.Tensor):
    if scores.dim() < 1 or scores.shape[-1] < 2:
        raise ValueError(f"scores must have shape [..., C] with C >= 2 (a positive and a negative), got "
                         f"{tuple(scores.shape)}")


def ranks_with_positive_last(scores: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (positive's rank [...], negatives' ranks [..., C-1]), 1-based, in one ranked list.

    descending_ranks breaks ties by index (the earlier index ranks first). Moving the positive to the last column
    therefore gives exactly our pessimistic rule: r = 1 + #{negatives with s >= s_0}."""
    _check(scores)
    lead = scores.shape[:-1]
    moved = torch.cat([scores[..., 1:], scores[..., :1]], dim=-1).reshape(-1, scores.shape[-1])   # (R, C)
    ranks = descending_ranks(moved.float().contiguous(), backend=backend).reshape(*lead, -1)       # (..., C)
    return ranks[..., -1], ranks[..., :-1]


def margin_reward(scores: torch.Tensor, delta: float = DEFAULT_DELTA) -> torch.Tensor:
    """R_Margin = max(0, cos(q, c_p) - max_n cos(q, c_n) - delta)   (PAPER.md, Section 3.4)."""
    _check(scores)
    hardest = scores[..., 1:].max(dim=-1).values  # the hardest negative: highest cosine to the query
    return (scores[..., 0] - hardest - delta).clamp(min=0.0)


def ranking_reward(scores: torch.Tensor, gamma: float = DEFAULT_GAMMA, backend: str = "auto",
                   return_rank: bool = False):
    """R_Rank = s_(r) * 1/(1 + ln r)  -  gamma * sum_{k != r} s_(k) * (ln k - 1)   (PAPER.md, Section 3.4).

    s_(k) is the score at rank k of the rollout's sorted list and r the positive's rank. First term: a high score for
    the positive and a place near the top. Second term: a negative placed low (large k) is penalised more for keeping
    a high score, so near negatives may stay close while far ones are pushed away. Note (ln k - 1) < 0 for k <= 2:
    the paper's formula *rewards* the negative at rank 2 (or 1) for scoring high."""
    r, neg_ranks = ranks_with_positive_last(scores, backend)
    s_pos = scores[..., 0]
    pos_term = s_pos / (1.0 + torch.log(r.to(scores.dtype)))
    neg_term = (scores[..., 1:] * (torch.log(neg_ranks.to(scores.dtype)) - 1.0)).sum(-1)
    R = pos_term - gamma * neg_term
    return (R, r) if return_rank else R


def total_reward(scores: torch.Tensor, alpha: float = 0.4, epsilon: float = 0.6, delta: float = DEFAULT_DELTA,
                 gamma: float = DEFAULT_GAMMA, return_parts: bool = False, backend: str = "auto"):
    """R_total = alpha * R_Margin + epsilon * R_Rank, alpha = 0.4, epsilon = 0.6 (PAPER.md, Table 4).

    With return_parts, also {"margin": R_Margin, "rank": R_Rank, "pos_rank": r} for logging."""
    R_margin = margin_reward(scores, delta)
    R_rank, r = ranking_reward(scores, gamma, backend, return_rank=True)
    R = alpha * R_margin + epsilon * R_rank
    return (R, {"margin": R_margin, "rank": R_rank, "pos_rank": r}) if return_parts else R


def sequence_credit(S: torch.Tensor, alpha: float = 0.4, epsilon: float = 0.6, delta: float = DEFAULT_DELTA,
                    gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Ours, not the paper's: per-sequence credit with the paper's R_total, for `--credit sequence`.

    In the paper every summary of a rollout (the query's and each candidate's) shares the rollout's one reward, so
    one good summary's credit is shared with the C others it was sampled with. Here each summary is scored for its
    own part, holding the other summaries at what the group's other rollouts wrote:
      query summary of rollout g:       mean over g' of R_total(query_g  vs  candidates of rollout g')
      candidate j's summary of rollout g: mean over g' of R_total(query_g' vs  candidates of rollout g', with
                                          candidate j's embedding taken from rollout g)
    S: (B, G, G, C) cosines, S[b, g', g, j] = cos(query of rollout g', candidate j of rollout g), positive at j = 0.
    Returns (B, G, 1 + C): the credit of each rollout's query summary, then of its C candidates' summaries.
    If all G rollouts embed alike, every credit equals the rollout's R_total."""
    if S.dim() != 4 or S.shape[1] != S.shape[2]:
        raise ValueError(f"S must be (B, G, G, C) cosines (query rollout, candidate rollout, candidate), "
                         f"got {tuple(S.shape)}")
    B, G, _, C = S.shape
    R = lambda x: total_reward(x, alpha, epsilon, delta, gamma)                          # noqa: E731
    credit_q = R(S).mean(dim=2)                                                     # (B, G): mean over g'
    base = S.diagonal(dim1=1, dim2=2).permute(0, 2, 1)                              # (B, G', C): the rollouts' own
    eye = torch.eye(C, dtype=torch.bool, device=S.device)                           # (C, C)
    # X[b, g', g, j, :] = rollout g' 's scores with slot j taken from rollout g
    X = torch.where(eye, S[..., :, None], base[:, :, None, None, :])                # (B, G', G, C, C)
    credit_c = R(X).mean(dim=1)                                                     # (B, G, C): mean over g'
    return torch.cat([credit_q[..., None], credit_c], dim=-1)                       # (B, G, 1 + C)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: rewards [B, G] -> (r - mean) / (std + eps) over each query's G rollouts.

    std is torch.std's default (N-1). A group whose rewards all tie gets zeros: no gradient from that query, which is
    why the train log reports the fraction of tied groups."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 rollouts per query, got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.2):
    """The GRPO objective per summary token, averaged over all generated tokens of the batch.

    logp, old_logp, ref_logp, mask: (S, T) -- S sequences; advantages: (S,), each sequence's rollout advantage.
      ratio  = exp(logp - old_logp)                      (= 1 on the first update of an on-policy batch)
      L_clip = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
      KL     = exp(ref - logp) - (ref - logp) - 1        (the k3 estimator; >= 0, and 0 where policy == reference)
      loss   = mean over tokens of (L_clip + beta * KL)
    Kept: clipping, KL to the frozen stage-2 model. Dropped: entropy bonus, value function (GRPO has none).
    Returns (loss, {"kl": mean KL, "clip_frac": fraction of tokens where the clip is active})."""
    A = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * A
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A
    l_clip = -torch.minimum(unclipped, clipped)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1.0
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    loss = ((l_clip + beta * kl) * m).sum() / n
    with torch.no_grad():
        clip_frac = (((ratio - 1.0).abs() > clip_eps).to(m.dtype) * m).sum() / n
        kl_mean = (kl * m).sum() / n
    return loss, {"kl": kl_mean.detach(), "clip_frac": clip_frac}
