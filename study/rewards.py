"""
Ours, not the paper's: scale-free rewards (`python -m study run --reward rank | zscore | ndcg`) and
per-summary credit (`--credit sequence`), beside the paper's in reward.py.
"""

from __future__ import annotations

import torch

from reward import ranks_with_positive_last, total_reward


# At fixed ranks R_Rank is linear in the cosines: doubling every score doubles it with the ranking
# unchanged, so a policy can earn by inflating scores. The rewards below depend on the order alone
# (rank, ndcg) or on the scores standardised within each list (zscore): s -> a * s + b (a > 0)
# leaves them unchanged. `weights`: total_reward's alpha, epsilon, delta and gamma.


def rank_reward(scores: torch.Tensor) -> torch.Tensor:
    """1 / (1 + ln r): the paper's positive term without the score; r by the pessimistic rule."""
    r, _ = ranks_with_positive_last(scores)
    return 1.0 / (1.0 + torch.log(r.to(torch.float32)))


def zscore_reward(scores: torch.Tensor, eps: float = 1e-6, **weights) -> torch.Tensor:
    """R_total(z), z = (s - mean_C s) / (std_C s + eps): the paper's reward on each list's
    standardised scores. A list whose scores all tie gets z = 0: the positive ranks last."""
    z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + eps)
    return total_reward(z, **weights)


def ndcg_reward(scores: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Graded NDCG of the ranked list: DCG = sum_i gain_i / log2(1 + rank_i), divided by the DCG of
    the gains sorted best first. gains [..., C] >= 0, the positive's (index 0) the largest: the
    paper's "hierarchy among negatives" with the relevance a world knows (a one-grain near miss
    earns partial credit). Ranks as R_Rank's: the pessimistic rule for the positive, negatives in
    descending order, ties by index."""
    r, neg_ranks = ranks_with_positive_last(scores)
    ranks = torch.cat([r[..., None], neg_ranks], -1).to(torch.float32)      # (..., C) a permutation
    gains = gains.to(torch.float32).expand_as(ranks)
    dcg = (gains / torch.log2(1 + ranks)).sum(-1)
    ideal = gains.sort(-1, descending=True).values
    at = torch.arange(2, ranks.shape[-1] + 2, dtype=torch.float32, device=ranks.device)
    idcg = (ideal / torch.log2(at)).sum(-1)
    return dcg / idcg.clamp(min=1e-12)


def sequence_credit(S: torch.Tensor, **weights) -> torch.Tensor:
    """Per-summary credit with the paper's R_total (--credit sequence).

    In the paper every summary of a rollout (the query's and each candidate's) shares the rollout's
    one reward, so one good summary's credit is shared with the C others it was sampled with. Here
    each summary is scored for its own part, the other summaries held at what the group's other
    rollouts wrote:
      query summary of rollout g:  mean over g' of R_total(query_g vs the candidates of rollout g')
      candidate j's summary of g:  mean over g' of R_total(query_g' vs the candidates of rollout g',
                                   candidate j's embedding taken from rollout g)
    S: (B, G, G, C) cosines, S[b, g', g, j] = cos(query of rollout g', candidate j of rollout g),
    the positive at j = 0. -> (B, G, 1 + C): the credit of each rollout's query summary, then of
    its C candidates' summaries. If all G rollouts embed alike, every credit is the rollout's
    R_total."""
    if S.dim() != 4 or S.shape[1] != S.shape[2]:
        raise ValueError(f"S must be (B, G, G, C) cosines (query rollout, candidate rollout, "
                         f"candidate), got {tuple(S.shape)}")
    B, G, _, C = S.shape
    credit_q = total_reward(S, **weights).mean(dim=2)                         # (B, G): mean over g'
    base = S.diagonal(dim1=1, dim2=2).permute(0, 2, 1)                       # (B, G', C): own lists
    eye = torch.eye(C, dtype=torch.bool, device=S.device)                      # (C, C)
    # X[b, g', g, j, :] = rollout g' 's scores with slot j taken from rollout g
    X = torch.where(eye, S[..., :, None], base[:, :, None, None, :])           # (B, G', G, C, C)
    credit_c = total_reward(X, **weights).mean(dim=1)                          # (B, G, C): over g'
    return torch.cat([credit_q[..., None], credit_c], dim=-1)                  # (B, G, 1 + C)
