"""The rewards (ELVA, Section 3.4) against values computed by hand; the GRPO pieces."""

import math

import pytest
import torch

import reward
import train
from tests.helpers import (rank_reward_by_hand, rank_rewards_at_equal_scores)


def test_reward_positive_at_rank_1():
    s = torch.tensor([[0.9, 0.5, 0.3]], dtype=torch.float64)
    assert reward.margin_reward(s, 0.05).item() == pytest.approx(0.35)
    want = rank_reward_by_hand(0.9, 1, [(0.5, 2), (0.3, 3)], 0.2)
    assert reward.ranking_reward(s, 0.2).item() == pytest.approx(want, abs=1e-12)

def test_reward_positive_at_rank_3():
    s = torch.tensor([0.4, 0.8, 0.1, 0.6], dtype=torch.float64)
    R, r = reward.ranking_reward(s, 0.2, return_rank=True)
    assert r.item() == 3
    by_hand = rank_reward_by_hand(0.4, 3, [(0.8, 1), (0.6, 2), (0.1, 4)], 0.2)
    assert R.item() == pytest.approx(by_hand, abs=1e-12)
    # clipped at zero: the positive loses to the hardest negative
    assert reward.margin_reward(s, 0.05).item() == 0.0

def test_reward_tie_ranks_positive_below():
    s = torch.tensor([0.5, 0.2, 0.5], dtype=torch.float64)
    R, r = reward.ranking_reward(s, 0.3, return_rank=True)
    assert r.item() == 2  # the tied negative takes rank 1
    assert R.item() == pytest.approx(rank_reward_by_hand(0.5, 2, [(0.5, 1), (0.2, 3)], 0.3),
                                     abs=1e-12)

def test_reward_all_equal_is_worst_rank():
    s = torch.full((4,), 0.3, dtype=torch.float64)
    R, r = reward.ranking_reward(s, 0.2, return_rank=True)
    assert r.item() == 4
    by_hand = rank_reward_by_hand(0.3, 4, [(0.3, 1), (0.3, 2), (0.3, 3)], 0.2)
    assert R.item() == pytest.approx(by_hand, abs=1e-12)
    assert reward.margin_reward(s, 0.0).item() == 0.0

def test_margin_value_and_clip():
    s = torch.tensor([[0.7, 0.2, 0.6], [0.1, 0.9, 0.0]])
    assert torch.allclose(reward.margin_reward(s, 0.05), torch.tensor([0.05, 0.0]), atol=1e-6)

def test_total_reward_weights_and_parts():
    s = torch.rand(3, 5, 7)
    R, parts = reward.total_reward(s, alpha=0.4, epsilon=0.6, delta=0.1, gamma=0.3,
                                   return_parts=True)
    want = 0.4 * reward.margin_reward(s, 0.1) + 0.6 * reward.ranking_reward(s, 0.3)
    assert R.shape == (3, 5)
    assert torch.allclose(R, want)
    assert torch.allclose(parts["margin"], reward.margin_reward(s, 0.1))
    assert torch.allclose(reward.total_reward(s, alpha=1.0, epsilon=0.0, delta=0.1),
                          reward.margin_reward(s, 0.1))

def test_ranking_reward_matches_sorted_list_definition():
    """Random inputs: the vectorised reward equals the paper's equation evaluated on an
    explicitly sorted list."""
    g = torch.Generator().manual_seed(0)
    # rounding makes ties common
    s = torch.rand(50, 9, generator=g, dtype=torch.float64).round(decimals=1)
    got = reward.ranking_reward(s, 0.2)
    for row, val in zip(s.tolist(), got.tolist()):
        pos, negs = row[0], sorted(row[1:], reverse=True)
        r = 1 + sum(n >= pos for n in negs)
        # negatives fill the other ranks, in order
        ranks = [k for k in range(1, len(row) + 1) if k != r]
        penalty = sum(n * (math.log(k) - 1) for n, k in zip(negs, ranks))
        want = pos / (1 + math.log(r)) - 0.2 * penalty
        assert val == pytest.approx(want, abs=1e-9)

def test_descending_ranks_with_ties_and_nan():
    """The reward's ranking rule (reward.descending_ranks): 1 + #{s_j > s_i} + #{j < i: s_j ==
    s_i}, NaN last."""
    g = torch.Generator().manual_seed(3)
    # integer scores: many exact ties
    s = torch.randint(0, 6, (4, 37), generator=g).float()
    got = reward.descending_ranks(s)
    assert got.dtype == torch.int64
    for r in range(4):
        for i in range(37):
            want = 1 + int((s[r] > s[r, i]).sum()) + int((s[r, :i] == s[r, i]).sum())
            assert got[r, i].item() == want
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[3.0, nan, 1.0, 1.0, 2.0, nan, -inf], [nan, nan, nan, 0.0, 0.0, 0.0, 0.0]])
    want = torch.tensor([[1, 6, 3, 4, 2, 7, 5], [5, 6, 7, 1, 2, 3, 4]])
    assert torch.equal(reward.descending_ranks(s), want)

def test_reward_rejects_bad_shape():
    with pytest.raises(ValueError, match="C >= 2"):
        reward.ranking_reward(torch.rand(4, 1))

def test_gamma_follows_the_candidate_count():
    for preset, C in (("smoke", 5), ("cpu", 9), ("gpu", 33)):
        args = train.get_args(["--preset", preset])
        assert args.gamma is None and 1 + args.n_hard + args.n_rand == C
    g = reward.auto_gamma(33)   # beyond the cap the negative term's weights sum to one
    assert sum(abs(g * (math.log(k) - 1)) for k in range(2, 34)) == pytest.approx(1.0)
    assert train.get_args(["--preset", "gpu", "--gamma", "0"]).gamma == 0.0
    s = torch.rand(4, 33)
    assert torch.allclose(reward.ranking_reward(s), reward.ranking_reward(s, reward.auto_gamma(33)))
    with pytest.raises(SystemExit, match="--gamma x: expected 'auto' or a finite number"):
        train.get_args(["--gamma", "x"])

def test_ranking_reward_falls_with_the_positive_rank_at_every_accepted_gamma():
    """For every candidate count and every gamma the flags accept (auto, or a number below the
    limit), R_Rank at equal scores pays the positive first more than last, and falls rank by rank.
    Before the fix, auto at C = 5 paid 0.220 first against 0.485 last (s = 0.5)."""
    for C in (2, 3, 4, 5, 6, 7, 9, 17, 33, 101):
        limit = reward.ordered_gamma_limit(C)
        for gamma in (reward.auto_gamma(C), 0.0, 0.5 * limit, 0.999 * limit):
            for s in (0.05, 0.5, 0.9):
                R = rank_rewards_at_equal_scores(C, gamma, s)
                assert R[0] > R[-1], (C, gamma, s)
                assert torch.all(R[:-1] > R[1:]), (C, gamma, s, R)
        # just past the limit the order breaks somewhere, and the flags refuse it
        assert not torch.all(rank_rewards_at_equal_scores(C, 1.01 * limit, 0.5).diff() < 0)
    R = rank_rewards_at_equal_scores(5, 1 / sum(abs(math.log(k) - 1) for k in range(2, 6)), 0.5)
    assert R[0] < R[-1]                       # the old auto gamma at C = 5: the inverted reward
    for argv in (["--preset", "smoke", "--gamma", "0.2"], ["--n_hard", "1", "--n_rand", "2",
                                                           "--gamma", "0.3"]):
        with pytest.raises(SystemExit, match="--gamma .*: expected below .* at C = "):
            train.get_args(argv)
    assert train.get_args(["--preset", "smoke", "--gamma", "0.15"]).gamma == 0.15

def test_group_advantages():
    a = reward.group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]))
    assert torch.equal(a[0], torch.zeros(4))                       # a tied group: no gradient
    std = torch.tensor([0.0, 1.0, 0.0, 1.0]).std().item()          # N-1 std = 0.5774
    assert torch.allclose(a[1], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4))
    with pytest.raises(ValueError, match="G >= 2"):
        reward.group_advantages(torch.ones(3, 1))

def test_grpo_loss_on_policy_no_kl_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    A = torch.randn(6, generator=g)
    loss, info = reward.grpo_loss(logp, logp.detach(), logp.detach(), A, mask, clip_eps=0.2,
                                  beta=0.0)
    want = -(A[:, None].expand(6, 5)[mask]).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert info["kl"].item() == pytest.approx(0.0, abs=1e-7)      # policy == reference
    assert info["clip_frac"].item() == 0.0

def test_grpo_loss_kl_positive_and_gradient_only_on_masked_tokens():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(4, 6, generator=g)).requires_grad_()
    ref = -torch.rand(4, 6, generator=g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 3:] = True
    loss, info = reward.grpo_loss(logp, logp.detach(), ref, torch.randn(4, generator=g), mask,
                                  beta=0.2)
    assert info["kl"].item() > 0
    loss.backward()
    assert torch.all(logp.grad[:, :3] == 0) and torch.all(logp.grad[:, 3:] != 0)

def test_grpo_clip_bounds_ratio():
    logp = torch.zeros(1, 1, requires_grad=True)
    old = torch.full((1, 1), -1.0)  # ratio e = 2.7 > 1 + eps
    loss, info = reward.grpo_loss(logp, old, logp.detach(), torch.tensor([1.0]),
                                  torch.ones(1, 1, dtype=torch.bool),
                                  clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.2)  # clipped at 1 + eps for a positive advantage
    assert info["clip_frac"].item() == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0            # no gradient through the clipped branch

def test_clip_fractions_low_and_high():
    mask = torch.ones(1, 4, dtype=torch.bool)
    # ratios 0.5, 1.5, 0.5, 1.5 against old 0
    logp = torch.log(torch.tensor([[0.5, 1.5, 0.5, 1.5]]))
    old = torch.zeros(1, 4)
    for A, low, high in ((-1.0, 0.5, 0.0), (1.0, 0.0, 0.5)):
        _, info = reward.grpo_loss(logp, old, old, torch.tensor([A]), mask, clip_eps=0.2, beta=0.0)
        assert info["clip_low"].item() == low and info["clip_high"].item() == high
        assert info["clip_frac"].item() == low + high

def test_grpo_loss_sequence_norm_by_hand():
    """--loss_norm sequence: each summary's token mean, then the mean over summaries; token
    (default): one mean."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # on-policy: L_clip = -A on every token
    A = torch.tensor([1.0, 3.0])
    tok, _ = reward.grpo_loss(logp, logp, logp, A, mask, beta=0.0)
    seq, _ = reward.grpo_loss(logp, logp, logp, A, mask, beta=0.0, norm="sequence")
    assert tok.item() == pytest.approx(-(3 * 1 + 1 * 3) / 4)
    assert seq.item() == pytest.approx(-(1 + 3) / 2)
    with pytest.raises(ValueError, match="norm must be"):
        reward.grpo_loss(logp, logp, logp, A, mask, norm="x")
