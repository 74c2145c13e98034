"""
The tests, by subject: the rewards against hand-computed values, the Triton kernels against their
torch references (through Triton's interpreter on CPU), the model, GrainWorld and the stages' data,
the stages, evaluation, real data, the Retriever, and what happens when things go wrong (bad flags,
non-finite steps, interrupted checkpoints, reused folders).

    pytest -q                 # the whole suite, CPU, about a minute on 2 cores
    pytest -q -k reward       # just the rewards
"""

import argparse
import json
import math
import random
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import elva
import eval as evaluation
import kernels
import mbeir as realdata   # the tests' `mbeir` is the sample folder (fixture)
import reward
import retriever
import runtime
import train
from data import Caption, Item, Mention, Obj, Scene


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world():
    return data.GrainWorld(data.WorldConfig(seed=3, n_train=200, n_val=20, n_test=60))


@pytest.fixture(scope="module")
def tok(world):
    return retriever.train_tokenizer(data.world_corpus(world, n=300))


def tiny_model(tok, seed=0):
    cfg = elva.ModelConfig(vit_dim=32, vit_layers=1, vit_heads=2, d_model=32, n_layers=2, n_heads=2,
                           vocab_size=tok.get_vocab_size(), max_summary_len=8)
    torch.manual_seed(seed)
    return retriever.Retriever(elva.build_model(cfg, tok).eval(), tok)


def some_items(world, n=4):
    qs = world.sample_queries(random.Random(0), n)
    return qs, [q.item for q in qs], [data.INSTRUCTIONS[q.task] for q in qs]


# --------------------------------------------------------------------------------------------------
# Rewards (ELVA, Section 3.4), computed by hand; the GRPO pieces


def rank_reward_by_hand(s_pos, r, negs_by_rank, gamma):
    """negs_by_rank: [(score, rank)] written out by hand."""
    return s_pos / (1 + math.log(r)) - gamma * sum(s * (math.log(k) - 1) for s, k in negs_by_rank)


def test_reward_positive_at_rank_1():
    s = torch.tensor([[0.9, 0.5, 0.3]], dtype=torch.float64)
    assert reward.margin_reward(s, 0.05).item() == pytest.approx(0.35)
    want = rank_reward_by_hand(0.9, 1, [(0.5, 2), (0.3, 3)], 0.2)
    assert reward.ranking_reward(s, 0.2).item() == pytest.approx(want, abs=1e-12)


def test_reward_positive_at_rank_3():
    s = torch.tensor([0.4, 0.8, 0.1, 0.6], dtype=torch.float64)
    R, r = reward.ranking_reward(s, 0.2, return_rank=True)
    assert r.item() == 3
    assert R.item() == pytest.approx(rank_reward_by_hand(0.4, 3, [(0.8, 1), (0.6, 2), (0.1, 4)], 0.2), abs=1e-12)
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
    assert R.item() == pytest.approx(rank_reward_by_hand(0.3, 4, [(0.3, 1), (0.3, 2), (0.3, 3)], 0.2), abs=1e-12)
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
        want = pos / (1 + math.log(r)) - 0.2 * sum(n * (math.log(k) - 1) for n, k in zip(negs, ranks))
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


def rank_rewards_at_equal_scores(C: int, gamma: float, s: float) -> torch.Tensor:
    """R_Rank with the positive at each rank 1..C, every score s: the positive just above every
    negative (rank 1) or just below the first r - 1 of them -- the ranks given as the rule gives
    them."""
    out = []
    for r in range(1, C + 1):
        neg = [k for k in range(1, C + 1) if k != r]
        ranks = torch.tensor([[r] + neg])
        scores = torch.full((1, C), s, dtype=torch.float64)   # float32 rounds near the limit
        out.append(reward.ranking_reward(scores, gamma, ranks=ranks)[0])
    return torch.stack(out)


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
    assert tok.item() == pytest.approx(-(3 * 1 + 1 * 3) / 4) and seq.item() == pytest.approx(-(1 + 3) / 2)
    with pytest.raises(ValueError, match="norm must be"):
        reward.grpo_loss(logp, logp, logp, A, mask, norm="x")


# --------------------------------------------------------------------------------------------------
# Triton kernels against their torch references (interpreter on CPU; compiled on CUDA)


# Where Triton really runs: compiled on a CUDA machine, else through its interpreter on the CPU
# (kernels.py sets TRITON_INTERPRET=1 before importing triton when there is no CUDA device).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DEVICE = DEVICES[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R,C,D", [(3, 2, 5), (4, 101, 37), (2, 9, 300), (5, 133, 37)])
def test_cosine_ranks_fused_kernel(device, R, C, D):
    g = torch.Generator().manual_seed(C)
    # candidates drawn from a few directions: exact score ties, also with the positive (column 0)
    dirs = torch.randn(3, D, generator=g)
    q = torch.randn(R, D, generator=g)
    c = dirs[torch.randint(0, 3, (R, C), generator=g)] * torch.randint(1, 3, (R, C, 1), generator=g)
    c[0, 1] = float("nan")                                              # a NaN candidate ranks last
    # a zero vector scores 0, not NaN
    c[-1, -1] = 0.0
    q, c = q.to(device), c.to(device)
    for last in (False, True):
        s_ref, k_ref = kernels.cosine_ranks(q, c, positive_last=last, backend="torch")
        s, k = kernels.cosine_ranks(q, c, positive_last=last, backend="triton")
        assert s.dtype == torch.float32 and s.shape == (R, C) and k.dtype == torch.int64
        assert (s.nan_to_num(9) - s_ref.nan_to_num(9)).abs().max().item() < 1e-5
        assert torch.equal(k.cpu(), k_ref.cpu()), f"max diff {(k - k_ref).abs().max().item()}"
    assert s_ref[-1, -1].item() == 0.0
    # positive_last gives the reward's rule: 1 + #{negatives scoring >= the positive} (NaN negatives
    # never count)
    pos_rank, _ = reward.ranks_with_positive_last(s_ref.cpu())
    assert torch.equal(k[:, 0].cpu(), pos_rank)
    # the ties were exercised
    assert any((s_ref[r, 1:] == s_ref[r, 0]).any() for r in range(R)) or C == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_ranks_low_precision_accumulates_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(4, 70, generator=g).to(DEVICE), torch.randn(4, 9, 70, generator=g).to(DEVICE)
    got, _ = kernels.cosine_ranks(q.to(dtype), c.to(dtype), backend="triton")
    ref, _ = kernels.cosine_ranks(q.to(dtype).float(), c.to(dtype).float(), backend="torch")
    assert (got - ref).abs().max().item() < 1e-5


def dense_best_positive_ranks(q, corpus, positives):
    """The definition, densely in float64: 1 + #{n not a positive: cos(q, c_n) >= best positive's
    cosine}."""
    qn = torch.nn.functional.normalize(q.cpu().double(), dim=-1)
    cn = torch.nn.functional.normalize(corpus.cpu().double(), dim=-1)
    S = qn @ cn.T                                                           # (M, N)
    pos = positives.cpu().reshape(q.shape[0], -1)
    is_pos = torch.zeros_like(S, dtype=torch.bool)
    for m in range(q.shape[0]):
        is_pos[m, pos[m][pos[m] >= 0]] = True
    best = S.masked_fill(~is_pos, float("-inf")).max(1).values
    return ((S >= best[:, None] - 1e-12) & ~is_pos).sum(1) + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,D,ties", [(70, 300, 37, True), (5, 129, 16, False), (65, 1000, 100, False)])
def test_corpus_ranks_kernel(device, M, N, D, ties):
    g = torch.Generator().manual_seed(M + N)
    if ties:  # small integers: exact dot products, many exact ties in cosine
        q = torch.randint(-2, 3, (M, D), generator=g).float()
        corpus = torch.randint(-2, 3, (N, D), generator=g).float()
    else:
        q, corpus = torch.randn(M, D, generator=g), torch.randn(N, D, generator=g)
    pos = torch.randint(0, N, (M,), generator=g)
    # exact copies of a positive (and one scaled by 2) tie with it: pessimistic, they rank above it
    if ties:
        corpus[(pos[0] + 1) % N] = corpus[pos[0]]
        corpus[(pos[1] + 1) % N] = 2 * corpus[pos[1]]
    multi = torch.randint(0, N, (M, 3), generator=g)
    multi[:, 0] = pos
    # shorter lists are padded with -1
    multi[::2, 2] = -1
    for positives in (pos, multi):
        qd, cd, pd = q.to(device), corpus.to(device), positives.to(device)
        ref = kernels.corpus_ranks(qd, cd, pd, backend="torch")
        # corpus > one tile
        got = kernels.corpus_ranks(qd, cd, pd, backend="triton", block_m=32, block_n=64)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), ref.cpu()), f"max diff {(got - ref).abs().max()}"
        assert torch.equal(ref.cpu(), dense_best_positive_ranks(q, corpus, positives))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_corpus_ranks_ties_are_pessimistic(dtype):
    """A collapsed model (every embedding equal) gets the worst rank, an exact duplicate of the
    positive ranks above it, and a NaN positive ranks last -- with the positive scored by the
    same arithmetic as every other candidate. The Triton interpreter mishandles bf16 tl.dot, so
    bf16 runs the kernel only where it is compiled (CUDA)."""
    g = torch.Generator().manual_seed(0)
    M, N, D = 9, 200, 24
    q = torch.randn(M, D, generator=g).to(DEVICE, dtype)
    pos = torch.randint(0, N, (M,), generator=g).to(DEVICE)
    backends = ["torch"] + (["triton"] if dtype == torch.float32 or DEVICE == "cuda" else [])
    collapsed = torch.randn(1, D, generator=g).expand(N, D).contiguous().to(DEVICE, dtype)
    corpus = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    nan_corpus = torch.full((N, D), float("nan"), device=DEVICE, dtype=dtype)
    for b in backends:
        opts = dict(block_m=32, block_n=64) if b == "triton" else {}
        assert torch.all(kernels.corpus_ranks(q, collapsed, pos, backend=b, **opts) == N), b
        plain = kernels.corpus_ranks(q, corpus, pos, backend=b, **opts)
        # an exact copy and a copy scaled by 2 of query m's positive: each ties it, ranks above
        for m in range(3):
            p = pos[m:m + 1]
            dup = torch.cat([corpus, corpus[p], 2 * corpus[p]])
            assert kernels.corpus_ranks(q[m:m + 1], dup, p, backend=b,
                                        **opts).item() == plain[m].item() + 2, b
        assert torch.all(kernels.corpus_ranks(q, nan_corpus, pos, backend=b, **opts) == N), b


def test_kernel_bad_input():
    with pytest.raises(ValueError, match="q \\[R, D\\]"):
        kernels.cosine_ranks(torch.rand(3, 4), torch.rand(3, 5, 6))
    with pytest.raises(ValueError, match="pos_index"):
        kernels.corpus_ranks(torch.rand(3, 4), torch.rand(5, 4), torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="at least one positive"):
        kernels.corpus_ranks(torch.rand(2, 4), torch.rand(5, 4), torch.tensor([[0, -1], [-1, -1]]))
    with pytest.raises(ValueError, match="backend"):
        kernels.corpus_ranks(torch.rand(2, 3), torch.rand(4, 3), torch.tensor([0, 1]),
                             backend="cuda")


# --------------------------------------------------------------------------------------------------
# The model


def test_template_and_ret_position(world, tok):
    ret = tiny_model(tok)
    qs, items, instr = some_items(world)
    summ = [ret.enc.summary(it.summary) for it in items]
    b, imgs = ret.batch(items, instr, summ)
    T = b["tokens"].shape[1]
    for i, it in enumerate(items):
        row = b["tokens"][i]
        rp = b["ret_pos"][i].item()
        assert row[rp].item() == ret.enc.ret
        # [RET] is the last real token
        assert rp == T - 1 or not b["attn"][i, rp + 1:].any()
        assert b["gen_mask"][i].sum().item() == len(summ[i]) + 1         # summary + [RET]
        text = tok.decode(row[b["attn"][i]].tolist(), skip_special_tokens=False)
        assert "Analyze and summarize the key information of the above input." in text
        assert text.endswith("ASSISTANT: " + it.summary + "[RET]"), text[-80:]
        n_img = (row == ret.enc.img).sum().item()
        assert n_img == (ret.model.cfg.n_img_tokens if it.scene is not None else 0)
    assert imgs.shape[0] == sum(it.scene is not None for it in items)


def test_embedding_shapes_dtype_unit_norm(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 6)
    b, imgs = ret.batch(items, instr, [ret.enc.summary(it.summary) for it in items])
    e = ret.model.embed(b, imgs)
    assert e.shape == (6, ret.model.cfg.d_model) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(6), atol=1e-5)
    logp, h = ret.model.token_logprobs(b, imgs)
    assert logp.shape == b["tokens"].shape and torch.all(logp[~b["gen_mask"]] == 0) and torch.all(logp <= 0)


def test_padding_does_not_change_embeddings(world, tok):
    """Left padding (batching with longer prompts) must not change an input's embedding:
    positions follow the mask."""
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 6)
    summ = [ret.enc.summary(it.summary) for it in items]
    b, imgs = ret.batch(items, instr, summ)
    together = ret.model.embed(b, imgs)
    for i in range(6):
        bi, ii = ret.batch(items[i:i + 1], instr[i:i + 1], summ[i:i + 1])
        alone = ret.model.embed(bi, ii if ii.shape[0] else None)
        assert (alone[0] - together[i]).abs().max().item() < 1e-5


def test_greedy_generation_is_deterministic_and_matches_no_cache(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 4)
    a = ret.summarise(items, instr)
    assert a == ret.summarise(items, instr)
    # the KV-cache path equals re-running the whole sequence each step
    b, imgs = ret.batch(items, instr, None)
    toks, attn = b["tokens"], b["attn"]
    for t in range(3):
        lg = ret.model.logits(ret.model.forward(toks, attn, imgs)[:, -1])
        lg[:, [ret.enc.pad, ret.enc.img]] = float("-inf")
        nxt = lg.argmax(-1)
        for i in range(4):
            if len(a[i]) > t:
                assert a[i][t] == nxt[i].item()
        toks = torch.cat([toks, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones(4, 1, dtype=torch.bool)], 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert ret.summarise(items, instr, 1.0, g1) == ret.summarise(items, instr, 1.0, g2)


def test_logprobs_use_the_sampled_distribution(world, tok):
    """token_logprobs scores tokens under the distribution generate samples from ([PAD] and [IMG]
    ruled out)."""
    ret = tiny_model(tok, seed=3)
    _, items, instr = some_items(world, 3)
    summ = ret.summarise(items, instr, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b, imgs = ret.batch(items, instr, summ)
    logp, h = ret.model.token_logprobs(b, imgs, temperature=0.7)
    logits = ret.model.logits(h[:, :-1]).float()
    logits[..., [ret.enc.pad, ret.enc.img]] = float("-inf")
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, b["tokens"][:, 1:, None])[..., 0]
    m = b["gen_mask"][:, 1:]
    assert torch.allclose(logp[:, 1:][m], want[m], atol=1e-5)
    assert torch.all(logp[~b["gen_mask"]] == 0)


def test_shared_prompts_give_the_full_pass_numbers(world, tok):
    """GRPO's G rollouts share each item's prompt: computing it once (KV cache expanded over the
    rollouts) gives the same log-probs, embeddings and gradients as the plain pass over every
    full sequence; generation with shared prompts samples what generation over repeated prompts
    samples."""
    ret = tiny_model(tok, seed=4)
    inst = rl_instances(world, 2, 2)
    G = 3
    ro = train.rollout(rl_args(group_size=G), ret.model, made_of(ret, inst),
                       torch.Generator().manual_seed(0),
                       nullcontext)
    once, once_instr = retriever.rollout_items(inst)
    K = len(once) // len(inst)
    items = [it for b in range(len(inst)) for _ in range(G) for it in once[b * K:(b + 1) * K]]
    instr = [x for b in range(len(inst)) for _ in range(G) for x in once_instr[b * K:(b + 1) * K]]
    # the full sequences, each on its own
    b, imgs = ret.batch(items, instr, ro.summaries)
    logp, h = ret.model.token_logprobs(b, imgs)
    # the summary part starts at column P
    P = b["tokens"].shape[1] - ro.batch["tokens"].shape[1]
    assert torch.allclose(logp[:, P:], ro.logp, atol=1e-5)
    e_full = ret.model.ret_embedding(h, b["ret_pos"])
    assert torch.allclose(e_full.view(ro.e.shape), ro.e, atol=1e-5)
    g_full = torch.autograd.grad(logp.sum() + e_full.sum(), ret.model.tok_emb.weight)[0]
    g_shared = torch.autograd.grad(ro.logp.sum() + ro.e.sum(), ret.model.tok_emb.weight)[0]
    assert torch.allclose(g_full, g_shared, atol=1e-5)
    pb, _ = ret.batch(items, instr, None)
    plain = ret.model.generate(pb["tokens"], pb["attn"], imgs, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert plain == ro.summaries


def test_length_groups_give_the_one_pass_numbers(world, tok):
    """Stages 1-2 run a batch as two passes of rows of similar length, each without its
    all-padding columns (elva.length_groups): the same log-probs, embeddings and gradients as one
    pass, images following their rows."""
    ret = tiny_model(tok, seed=5)
    qs = world.sample_queries(random.Random(1), 12)
    items = [q.item for q in qs] + [q.positive for q in qs]
    instr = [data.INSTRUCTIONS[q.task] for q in qs] + [None] * len(qs)
    drop = [i % 3 == 0 for i in range(len(items))]
    b, imgs = ret.batch(items, instr, ret.enc.reference_summaries(items, drop))
    # rows with and without an image
    assert 0 < len(imgs) < len(items)
    parts = list(elva.length_groups(b, imgs, 2, ret.model.img_id, ret.model.cfg.n_img_tokens))
    assert sorted(r for rows, *_ in parts for r in rows.tolist()) == list(range(len(items)))
    assert sum(p["tokens"].numel() for _, _, p, _ in parts) < b["tokens"].numel()   # less padding
    outs = []
    for groups in (1, 2):
        logp, h = ret.model.token_logprobs(b, imgs, groups=groups)
        e = ret.model.ret_embedding(h, b["ret_pos"])
        grad = torch.autograd.grad(logp.sum() + e.sum(), ret.model.patch_embed.weight)[0]
        outs.append((logp, e, grad))
    for one, two in zip(*outs):
        assert torch.allclose(one, two, atol=1e-5)
    # the images' gradient is checked too
    assert outs[0][2].abs().sum() > 0


def test_checkpoint_round_trip_and_bad_checkpoints(world, tok, tmp_path):
    """One model.safetensors holds weights, config, tokenizer and record; a damaged file, one
    whose config does not fit its weights, or a missing folder is one line; a checkpoint of the
    layout before (config.json naming model-<step>.safetensors) still loads."""
    from safetensors.torch import load_file, save_file
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 3)
    e1, _ = ret.embed_items(items, instr)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 3})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors"]
    ret2 = retriever.Retriever.from_pretrained(tmp_path / "ck")
    e2, _ = ret2.embed_items(items, instr)
    assert torch.equal(e1, e2) and ret2.meta["step"] == 3
    # a config that does not fit the weights
    path = tmp_path / "ck" / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    cfg = json.loads(header["config"])
    save_file(load_file(str(path)), str(tmp_path / "x.safetensors"),
              {**header, "config": json.dumps({**cfg, "d_model": 64})})
    (tmp_path / "bad").mkdir()
    (tmp_path / "x.safetensors").rename(tmp_path / "bad" / "model.safetensors")
    with pytest.raises(data.BadInput, match="do not match the config saved with them"):
        retriever.load_checkpoint(tmp_path / "bad")
    # a damaged file (a write cut short by hand)
    (tmp_path / "bad" / "model.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.BadInput, match="damaged or not a checkpoint"):
        retriever.load_checkpoint(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        retriever.load_checkpoint(tmp_path / "nowhere")
    # the layout before: config.json naming the weights file, tokenizer.json beside it
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(str(path)), str(old / "model-000003.safetensors"))
    tok.save(str(old / "tokenizer.json"))
    (old / "config.json").write_text(json.dumps({"model": cfg, "world": {}, "step": 3, "files": {
        "model": {"name": "model-000003.safetensors"}}}))
    e3, _ = retriever.Retriever.from_pretrained(old).embed_items(items, instr)
    assert torch.equal(e1, e3)


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_round_trip_keeps_torch_placement(tok, tmp_path, fused):
    """--resume restores AdamW through load_state_dict: the same state as saved, and each tensor
    where this kind of AdamW keeps it (fused: `step` on the parameter's device as float32; plain:
    on the CPU)."""
    ret = tiny_model(tok)
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3, fused=fused)
    for _ in range(2):
        opt.zero_grad()
        ret.model.norm.weight.sum().backward()
        opt.step()
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 1},
                            optimizer=opt)
    fresh = torch.optim.AdamW(ret.model.parameters(), lr=1e-3, fused=fused)
    name = retriever.read_checkpoint(tmp_path / "ck")[3]["optimizer"]
    fresh.load_state_dict(torch.load(tmp_path / "ck" / name, weights_only=True))   # as --resume
    a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    p = ret.model.norm.weight
    assert fresh.state[p]["step"].device == p.device
    fresh.zero_grad()
    p.sum().backward()
    fresh.step()                                                        # the restored state steps


# --------------------------------------------------------------------------------------------------
# GrainWorld and the stages' data


def test_world_is_deterministic_and_splits_disjoint():
    a = data.GrainWorld(data.WorldConfig(seed=5, n_train=50, n_val=10, n_test=20))
    b = data.GrainWorld(data.WorldConfig(seed=5, n_train=50, n_val=10, n_test=20))
    assert a.splits == b.splits
    assert not set(a.splits["train"]) & set(a.splits["test"])
    qa = a.sample_queries(random.Random(1), 10)
    qb = b.sample_queries(random.Random(1), 10)
    assert [q.item for q in qa] == [q.item for q in qb]
    img1 = data.render(a.splits["test"][0], 32, 1)
    assert torch.equal(retriever.image_tensor(img1, 32),
                       retriever.image_tensor(data.render(a.splits["test"][0], 32, 1), 32))
    assert not torch.equal(retriever.image_tensor(img1, 32),
                           retriever.image_tensor(data.render(a.splits["test"][0], 32, 2), 32))


def test_relevance_is_exact_on_hand_built_scenes():
    red_circle_left = Obj("circle", "red", "large", 1, 0)
    blue_square_right = Obj("square", "blue", "small", 1, 2)
    s = Scene.of([red_circle_left, blue_square_right])
    swapped = Scene.of([Obj("circle", "blue", "large", 1, 0), Obj("square", "red", "small", 1, 2)])
    mirrored = Scene.of([Obj("circle", "red", "large", 1, 2), Obj("square", "blue", "small", 1, 0)])
    rel = Caption((Mention("circle", "red"), Mention("square", "blue")), "left of")
    assert data.satisfies(s, rel)
    assert not data.satisfies(swapped, rel)        # binding
    assert not data.satisfies(mirrored, rel)       # relation
    assert data.satisfies(mirrored, Caption(rel.mentions, None))        # "and" states no relation
    assert data.satisfies(s, Caption((Mention("square", size="small"),)))
    assert not data.satisfies(s, Caption((Mention("square", size="large"),)))
    assert rel.n_grains() == 5 and rel.text() == "a red circle left of a blue square"


def test_near_misses_differ_and_are_irrelevant(world):
    bench = world.mrbench_mini(6)
    for task, (queries, pool) in bench.items():
        assert len(queries) == 6
        for q in queries:
            assert q.n_grains >= 2 and q.distractors
            assert data.relevant(task, q.item, q.positive)
            for kind, d in q.distractors:
                assert not data.relevant(task, q.item, d), (task, kind)


def test_balanced_negatives():
    scores = torch.tensor([[0.99, 0.9, 0.8, 0.7, 0.1, 0.2, 0.3]])
    rel = torch.tensor([[False, True, False, False, False, False, False]])
    idx = train.balanced_negatives(scores, rel, n_hard=2, n_rand=2, threshold=0.95,
                                  generator=torch.Generator())
    # 0 is above the threshold, 1 is relevant
    assert idx[0, :2].tolist() == [2, 3]
    assert set(idx[0, 2:].tolist()) <= {0, 4, 5, 6} and len(set(idx[0].tolist())) == 4
    with pytest.raises(ValueError, match="fewer than"):
        train.balanced_negatives(scores, rel, 4, 3, 0.95, torch.Generator())
    # too few below the threshold
    idx = train.balanced_negatives(scores, rel, 6, 0, 0.95, torch.Generator())
    # above-threshold ones come last
    assert idx[0].tolist() == [2, 3, 6, 5, 4, 0]


def test_false_negatives_are_masked_across_tasks():
    """A text->image caption satisfied by another query's image->image positive is a true match,
    whatever task that positive came from: InfoNCE must not push it away."""
    red = Scene.of([Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 2, 2)])
    cap = Caption((Mention("circle", "red"),))
    t2i = data.Query("t2i", Item(text=cap.text(), summary=cap.summary(), caption=cap),
                     Item(scene=red, summary=red.summary(), render_seed=1), cap.n_grains())
    i2i = data.Query("i2i", Item(scene=red, summary=red.summary(), render_seed=2),
                     Item(scene=red, summary=red.summary(), render_seed=3), 6)
    full = Caption((Mention("circle", "red", "large"),))
    i2t = data.Query("i2t", Item(scene=red, summary=red.summary(), render_seed=4),
                     Item(text=full.text(), summary=full.summary(), caption=full), 3)
    m = data.in_batch_false_negatives([t2i, i2i, i2t])
    # the i2i positive satisfies the caption; the t2i positive is the i2i scene
    assert m[0, 1] and m[1, 0]
    # a caption is never a match for an image task (another modality)
    assert not m[0, 2] and not m[1, 2]
    # the i2t query's in-batch candidates are images
    assert not m[2].any() and not m.diagonal().any()
    # over real batches: every relevant in-batch candidate is masked
    w = data.GrainWorld(data.WorldConfig(seed=0, n_train=300, n_val=10, n_test=20))
    qs = w.sample_queries(random.Random(0), 48)
    m = data.in_batch_false_negatives(qs)
    assert m.sum() > sum(m[i, j] for i in range(48) for j in range(48) if qs[i].task == qs[j].task)


def test_test_scenes_stay_out_of_training():
    """Edit targets and near misses derived from test scenes are never training scenes (default
    world)."""
    w = data.GrainWorld(data.WorldConfig())
    train_scenes = set(w.splits["train"])
    queries, pool = w.standard_split("it2i", 200)
    assert not any(q.item.target in train_scenes for q in queries)
    assert not any(c.scene in train_scenes for c in pool)
    for task, (qs, pl) in w.mrbench_mini(100).items():
        assert not any(c.scene in train_scenes for c in pl if c.scene is not None), task


def test_no_test_scene_reaches_training():
    """Replay the scenes the cpu preset's training renders -- 1000 stage-2 batches of 48 (their
    images, it2i targets and positives, drawn as make_stage2_inputs draws them) and the RL mining
    pools -- against every scene the test queries derive (standard-split targets and pools,
    MRBench-mini targets, positives and near misses): none shared. (Before training's derived
    scenes also kept one edit away from every held-out scene, 7 were.)"""
    w = data.GrainWorld(data.WorldConfig(seed=0, n_train=6000, n_test=500))
    test = set()
    for task in data.TASKS:
        qs, pool = w.standard_split(task, 200)
        test |= {q.item.target for q in qs} | {c.scene for c in pool}
    for task, (qs, pool) in w.mrbench_mini(100).items():
        test |= {q.item.target for q in qs} | {c.scene for c in pool}
    trained = set()
    for step in range(1000):
        for q in w.sample_queries(random.Random(f"0-contrastive-{step}"), 48):
            trained |= {q.item.scene, q.item.target, q.positive.scene}
    rng = random.Random("0-rl-data")
    for task in data.TASKS:
        trained |= {c.scene for c in w.rl_pool(task, 300, rng)}
    assert not (trained & test) - {None}


def test_a_process_takes_its_share_of_the_global_batch():
    """data.Pairs.part: under torchrun each process takes rows r*b..(r+1)*b of every block of the
    global batch, and its false-negative rows with the columns in the order the InfoNCE gather
    lays the candidates out (process 0's blocks, then process 1's): together the processes hold
    the whole batch, and each query's own target sits at offset + i among the gathered
    candidates."""
    B, blocks = 4, 3
    # queries, positives, extras
    items = [f"{k}{i}" for k in "qpe" for i in range(B)]
    false_neg = torch.zeros(B, 2 * B, dtype=torch.bool)
    # query 0 also matches extra 3
    false_neg[0, 1 * B + 3] = True
    # query 2 also matches positive 1
    false_neg[2, 1] = True
    batch = data.Pairs(items, [None] * len(items), [i % 2 == 0 for i in range(3 * B)], false_neg,
                       blocks=blocks, n_queries=B)
    one = batch.part(0, 1)
    assert one.items == items and torch.equal(one.false_neg, false_neg) and one.n_queries == B
    parts = [batch.part(r, 2) for r in (0, 1)]
    assert parts[0].items == ["q0", "q1", "p0", "p1", "e0", "e1"]
    assert parts[1].items == ["q2", "q3", "p2", "p3", "e2", "e3"]
    # what Run.gather concatenates
    gathered = [it for p in parts for it in p.items[2:]]
    for r, p in enumerate(parts):
        assert p.drop == [batch.drop[k * B + r * 2 + i] for k in range(3) for i in range(2)]
        for i in range(2):
            query = p.items[i]
            # the target: offset r * 4, then i
            assert gathered[r * 4 + i] == "p" + query[1]
            matches = {gathered[j] for j in range(8) if p.false_neg[i, j]}
            want = {items[B + j] for j in range(2 * B) if false_neg[int(query[1]), j]}
            assert matches == want


# --------------------------------------------------------------------------------------------------
# The stages: 1-2 (InfoNCE), 3 (ELVA's GRPO), the pipeline, torchrun; and the study's variants


def same_weights(a, b) -> bool:
    """Two checkpoints' weights, bit for bit."""
    wa, wb = retriever.read_checkpoint(a)[0], retriever.read_checkpoint(b)[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def rl_args(*flags, **kw):
    """train.py's arguments on the smoke preset, then `kw` set on them."""
    args = train.get_args(["--preset", "smoke", *flags])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def stage_of(ret, args, tmp_path, name="elva", lr=1e-3, steps=100):
    """A one-process Run (no run folder) and a stage of it in tmp_path: what a step reads."""
    args.out = str(tmp_path)
    run = runtime.Run.local(args)
    opt = train.adamw(ret.model.parameters(), lr, 0.0, run.device)
    return run, run.stage(name, steps, ret, opt, {"world": {}})


def made_of(ret, instances) -> data.Instances:
    """A rollout batch as the stage-3 stream makes it: the instances and their encoded prompts."""
    return retriever.encode_rollout(ret.enc, ret.prompt_limit, instances)


def teacher_forced(ret, items, instr, drop):
    """Items embedded with their reference summaries teacher-forced (none where drop[i]), as
    stages 1-2 embed them."""
    b, imgs = ret.batch(items, instr, ret.enc.reference_summaries(items, drop))
    return train.teacher_forced(ret.model, b, imgs, torch.tensor(drop), nullcontext)


def rl_instances(world, n=2, n_neg=3):
    rng = random.Random(0)
    out = []
    for q in world.sample_queries(rng, n):
        pool = [data.candidate_item(q.task, rng, s) for s in rng.sample(world.splits["train"], 20)]
        negs = [c for c in pool if not data.relevant(q.task, q.item, c)][:n_neg]
        out.append((q, negs))
    return out


def test_info_nce_hand_computed():
    eq = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ec = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    tau = 0.5
    # row 0: logits [0.6, 0.0]/tau, target 0; row 1: logits [0.8, 1.0]/tau, target 1
    l0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0)))
    l1 = -math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))
    assert train.info_nce(eq, ec, tau).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    masked = train.info_nce(eq, ec, tau, torch.tensor([[False, True], [False, False]]))
    # a known false negative is not a negative
    assert masked.item() == pytest.approx((0.0 + l1) / 2, abs=1e-6)


def test_summary_dropout_empties_summary_and_leaves_lm_loss(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 4)
    drop = [True, False, True, False]
    e, logp, lm_mask = teacher_forced(ret, items, instr, drop)
    assert e.shape[0] == 4 and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    # dropped rows: no LM loss at all
    assert lm_mask[0].sum() == 0 and lm_mask[2].sum() == 0
    assert lm_mask[1].sum() == len(ret.enc.summary(items[1].summary)) + 1
    assert torch.all(logp[~lm_mask] == 0)
    # a dropped row embeds the prompt alone: [RET] right after "ASSISTANT:"
    b, imgs = ret.batch(items[:1], instr[:1], [[]])
    assert torch.allclose(e[0], ret.model.embed(b, imgs)[0], atol=1e-5)


def test_nli_triplets_and_the_text_stage(tmp_path, world):
    """Stage 1 in miniature: every premise holds of its scene, so does the caption it entails
    (and the entailed caption holds of every scene the premise holds of, checked over the world),
    the contradiction does not; then `--stages text,contrastive` trains stage 1 and starts stage
    2 from it."""
    rng = random.Random(0)
    scenes = world.splits["train"]
    n = 0
    for s in scenes[:60]:
        t = data.nli_triplet(rng, s)
        if t is None:
            continue
        premise, hyp, contra = t
        n += 1
        assert data.satisfies(s, premise) and data.satisfies(s, hyp) and not data.satisfies(s,
                                                                                            contra)
        assert hyp.text() != premise.text() and premise.n_grains() >= 2
        # entailment
        assert all(data.satisfies(o, hyp) for o in scenes if data.satisfies(o, premise))
    assert n >= 50
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "3", "--steps", "1",
                "--out", str(out), "--no_eval"])
    text = retriever.load_checkpoint(out / "text")[0]
    _, cfg, _, meta = retriever.read_checkpoint(out / "text")
    assert meta["step"] == 2
    stage2 = retriever.load_checkpoint(out / "contrastive")[0]
    fresh = elva.build_model(elva.ModelConfig(**cfg), retriever.load_tokenizer(out / "tokenizer.json"))
    # one step of stage 2 moved the weights a little from stage 1's, not from a fresh model's
    d_text = sum((a - b).abs().sum() for a, b in zip(text.parameters(), stage2.parameters()))
    d_fresh = sum((a - b).abs().sum() for a, b in zip(fresh.parameters(), stage2.parameters()))
    assert d_text < d_fresh
    with pytest.raises(SystemExit, match="text together with contrastive"):
        train.get_args(["--stages", "text,elva"])


def test_rollout_shapes(world, tok):
    ret = tiny_model(tok)
    args = rl_args(group_size=3)
    ro = train.rollout(args, ret.model, made_of(ret, rl_instances(world, 2, 3)),
                       torch.Generator().manual_seed(0),
                       nullcontext)
    assert ro.shape == (2, 3, 2 + 3) and ro.scores.shape == (2, 3, 1 + 3) and ro.e.shape[:3] == (2, 3, 5)
    assert reward.total_reward(ro.scores).shape == (2, 3)
    assert ro.logp.shape[0] == 2 * 3 * (2 + 3) and ro.logp.requires_grad
    # each item's prompt held once
    assert ro.batch["prompt_tokens"].shape[0] == 2 * (2 + 3)


def test_forced_ret_is_not_trained(world, tok):
    """A [RET] appended after max_summary_len tokens was not sampled: it is outside the tokens
    GRPO trains."""
    ret = tiny_model(tok)
    # most summaries run out of tokens
    ret.model.cfg.max_summary_len = 2
    args = rl_args(group_size=2)
    ro = train.rollout(args, ret.model, made_of(ret, rl_instances(world, 1, 2)),
                       torch.Generator().manual_seed(0),
                       nullcontext)
    rows = torch.arange(len(ro.summaries))
    # sampled its [RET] within 2 tokens
    ended = [len(s) < 2 for s in ro.summaries]
    assert ro.sampled[rows, ro.batch["ret_pos"]].tolist() == ended and not all(ended)
    # every other summary token is trained
    assert torch.equal(ro.sampled | (ro.batch["gen_mask"] & ~ro.sampled), ro.batch["gen_mask"])
    assert int((ro.batch["gen_mask"] & ~ro.sampled).sum()) == ended.count(False)


def test_rollout_ranks_are_the_rewards_ranks(world, tok):
    """The rollout scores and ranks in one pass (kernels.cosine_ranks, positive last); the reward
    read from those ranks equals the reward that ranks the scores itself."""
    ret = tiny_model(tok)
    ro = train.rollout(rl_args(group_size=3), ret.model, made_of(ret, rl_instances(world, 2, 3)),
                       torch.Generator().manual_seed(0), nullcontext)
    r, _ = reward.ranks_with_positive_last(ro.scores)
    assert torch.equal(ro.ranks[..., 0], r)
    assert torch.equal(reward.total_reward(ro.scores, ranks=ro.ranks),
                       reward.total_reward(ro.scores))


def test_grpo_step_is_the_paper_step_and_its_clip_is_inert(world, tok, tmp_path):
    """train.grpo_step takes no hook (the reward and advantage are inline) and, on-policy, its
    ratio is exactly 1: the clip never acts; its update moves the policy, not the reference."""
    import inspect
    assert list(inspect.signature(train.grpo_step).parameters) == ["args", "run", "stage", "ref",
                                                                   "made", "gen", "step"]
    ret, ref = tiny_model(tok, seed=1), tiny_model(tok, seed=1)
    run, stage = stage_of(ret, rl_args(group_size=4), tmp_path)
    before = {k: v.clone() for k, v in ret.model.state_dict().items()}
    rec = train.grpo_step(run.args, run, stage, ref, made_of(ret, rl_instances(world, 2, 2)),
                          torch.Generator().manual_seed(0), 0)
    assert rec["clip_low"] == 0 and rec["clip_high"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in ret.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())


def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    """train.py --preset smoke (shortened) writes loadable checkpoints for both stages, then
    resumes as a no-op; train.py --explain walks one RL instance of the stage-2 checkpoint through
    the paper's step."""
    out = tmp_path / "run"
    common = ["--preset", "smoke", "--out", str(out), "--steps", "6", "--rl_steps", "2", "--no_eval"]
    train.main(common)
    for stage in ("contrastive", "elva"):
        model, _, meta = retriever.load_checkpoint(out / stage)
        assert meta["stage"] == stage
        assert (out / stage / "log.jsonl").read_text().count("\n") >= 2
    first = (out / "elva" / "model.safetensors").read_bytes()
    train.main(common + ["--resume"])
    # complete stages are not re-run
    assert (out / "elva" / "model.safetensors").read_bytes() == first
    # stage 3 follows the paper: the vision tower and projector stay frozen, the language model
    # moves
    init, rl = retriever.load_checkpoint(out / "contrastive")[0], retriever.load_checkpoint(out / "elva")[0]
    assert all(torch.equal(a, b) for a, b in zip(init.vision_parameters(), rl.vision_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(init.blocks.parameters(), rl.blocks.parameters()))
    capsys.readouterr()
    train.main(["--preset", "smoke", "--explain", str(out / "contrastive"), "--explain_task", "t2i"])
    shown = capsys.readouterr().out
    G = train.get_args(["--preset", "smoke"]).group_size
    assert "task t2i" in shown and shown.count("ranked list:") == G and shown.count("advantage") == G + 1
    assert "negative 4:" in shown and "R_Margin" in shown and "R_total mean" in shown
    evaluation.main(["--ckpt", str(out / "contrastive"), "--queries", "6", "--mrbench_per_task",
                     "2", "--threads", "1"])
    shown = capsys.readouterr().out
    for row in ("sees binding: reference summary likelier than its edit (own image / another's)",
                "sees relation", "sees position", "says binding: greedy image summaries right",
                "says relation", "reads binding: near-miss win, reference summaries on both sides",
                "reads relation (text): caption nearer its rewording than a contradiction"):
        assert f"| {row}" in shown, row


def test_the_run_prints_each_stages_minutes(tmp_path, capsys):
    """Stage lines carry the stage's ETA; the run ends with its time and each stage's minutes."""
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "3", "--steps", "2",
                "--no_eval", "--threads", "1", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "text 00000/3" in out and "| eta " in out
    assert re.search(r"total time \d+\.\d min \(text \d+\.\d \| contrastive \d+\.\d\)", out)


def test_dataloader_workers_change_nothing_but_speed(tmp_path):
    """Every stage makes its batches in DataLoader workers from per-step seeds: any number of
    workers trains the same bytes."""
    base = ["--preset", "smoke", "--stages", "text,contrastive,elva", "--text_steps", "3", "--steps", "4",
            "--rl_steps", "2", "--no_eval", "--threads", "1"]
    train.main(base + ["--out", str(tmp_path / "w0"), "--workers", "0"])
    train.main(base + ["--out", str(tmp_path / "w2"), "--workers", "2"])
    for stage in ("text", "contrastive", "elva"):
        assert same_weights(tmp_path / "w0" / stage, tmp_path / "w2" / stage), stage


def test_import_reward_and_train_stay_light():
    """import reward needs only torch (no Triton); import train loads neither eval.py nor
    mbeir.py."""
    import subprocess
    import sys
    code = ("import sys; import reward; assert 'triton' not in sys.modules and 'kernels' not in "
            "sys.modules; "
            "import train; assert 'eval' not in sys.modules and 'mbeir' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def two_process_worker(rank, ports, argv_sets, out, main=train.main):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # one rendezvous per run, as torchrun gives each launch its own
    for port, argv in zip(ports, argv_sets):
        os.environ["MASTER_PORT"] = str(port)
        main(argv)
    os.environ["MASTER_PORT"] = str(ports[-1])
    import torch.distributed as dist
    dist.init_process_group("gloo")
    # GRPO's loss on this process's half of the same rollouts, normalised by the global token count
    logp, old, ref, A, mask = _grpo_tensors()
    mine = slice(rank * 4, rank * 4 + 4)
    x = logp[mine].clone().requires_grad_()
    run = runtime.Run.local(argparse.Namespace())
    run.world, run.rank = 2, rank
    n_tokens = run.tokens(mask[mine])
    loss, _ = reward.grpo_loss(x, old[mine], ref[mine], A[mine], mask[mine], 0.2, 0.2,
                               n_tokens=n_tokens)
    loss.backward()
    torch.save((loss.detach(), x.grad), f"{out}/grpo{rank}.pt")
    dist.destroy_process_group()


def _grpo_tensors():
    """8 rollout sequences of 5 tokens (policy, old and reference log-probs, advantages, sampled
    mask)."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 5, generator=g) * 3
    old, ref = logp + 0.1 * torch.randn(8, 5, generator=g), logp + 0.3 * torch.randn(8, 5,
                                                                                     generator=g)
    mask = torch.rand(8, 5, generator=g) > 0.3
    # the two halves hold different token counts
    mask[:4, :] = True
    return logp, old, ref, torch.randn(8, generator=g), mask


def two_process_runs(out):
    common = ["--preset", "smoke", "--text_steps", "2", "--steps", "3", "--no_eval", "--threads",
              "1", "--device", "cpu"]
    return [common + ["--stages", "text,contrastive", "--out", str(out / "a")],
            common + ["--stages", "contrastive", "--out", str(out / "b")]]


def free_ports(n: int) -> list[int]:
    import socket
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def same_logs_and_weights(one, two, stage, keys=("loss", "infonce", "lm", "masked_false_neg")):
    """A one-process and a two-process run of a stage: the same loss each step, up to float
    summation order (tolerance 1e-4), counts summed over the processes, and the same weights."""
    a_log, b_log = ([json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]
                    for run in (one, two))
    assert len(a_log) == len(b_log) > 0
    for a, b in zip(a_log, b_log):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), (stage, a["step"], k)
    w1 = retriever.load_checkpoint(one / stage)[0].state_dict()
    w2 = retriever.load_checkpoint(two / stage)[0].state_dict()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1), stage


def test_torchrun_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    ports = free_ports(3)
    for argv in two_process_runs(tmp_path / "one"):
        train.main(argv)
    mp.spawn(two_process_worker, args=(ports, two_process_runs(tmp_path / "two"), str(tmp_path)),
             nprocs=2, join=True)
    # (stage 2 from stage 1 differs by more: AdamW's first steps amplify summation-order noise)
    for run, stage in (("a", "text"), ("b", "contrastive")):
        same_logs_and_weights(tmp_path / "one" / run, tmp_path / "two" / run, stage)
    # the text stage never touches the vision tower: no process gives it a gradient, so AdamW
    # leaves it alone under two processes as under one (no weight decay)
    text = retriever.load_checkpoint(tmp_path / "two" / "a" / "text")[0]
    assert torch.equal(text.vit_norm.weight, torch.ones_like(text.vit_norm.weight))
    # GRPO under torchrun: each process samples its own rollouts (its own seed), so a 2-process run
    # is not the same draw as a 1-process run; for the same rollouts, the processes' mean loss and
    # averaged gradient are the batch's
    logp, old, ref, A, mask = _grpo_tensors()
    x = logp.clone().requires_grad_()
    loss, _ = reward.grpo_loss(x, old, ref, A, mask, 0.2, 0.2)
    loss.backward()
    (l0, g0), (l1, g1) = (torch.load(tmp_path / f"grpo{r}.pt") for r in (0, 1))
    assert ((l0 + l1) / 2).item() == pytest.approx(loss.item(), rel=1e-6)
    # average_gradients divides by 2
    assert torch.allclose(torch.cat([g0, g1]) / 2, x.grad, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Evaluation: metrics, GrainWorld's benchmarks, the reward audit


def test_retrieval_metrics_by_hand():
    ranks = torch.tensor([1, 3, 12])
    m = retriever.recall_mrr(ranks)
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@5"] == pytest.approx(2 / 3)
    assert m["R@10"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)
    # NDCG@10: query 0 has positives {4, 7}, retrieved at ranks 2 and 3; query 1 has {9}, retrieved
    # first
    top = torch.tensor([[0, 4, 7, 1, 2, 3, 5, 6, 8, 10], [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    want0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert retriever.ndcg_at_k(top, [[4, 7], [9]]) == pytest.approx((want0 + 1.0) / 2)


def test_chance_recall_by_hand():
    # pool 10, one relevant: 5/10; all relevant: 1; 2 relevant: 1 - C(8,5)/C(10,5) = 1 - 56/252
    assert retriever.chance_recall(torch.tensor([1]), 10, 5) == pytest.approx(0.5)
    assert retriever.chance_recall(torch.tensor([10, 2]), 10,
                                    5) == pytest.approx((1 + 1 - 56 / 252) / 2)


def test_streamed_search_matches_dense():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 16, generator=g), torch.randn(300, 16, generator=g)
    s, i = retriever.Retriever.search(q, c, k=5, chunk=64)                  # streamed in chunks of 64
    dense = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    ds, di = dense.topk(5, dim=1)
    assert torch.equal(i, di) and torch.allclose(s, ds, atol=1e-6)


def test_ranked_outputs_follow_the_reward_rule():
    """search, NDCG and the run file rank as the reward does: NaN last; among equal scores a
    positive after the others. A collapsed model (all embeddings equal) must score R@10 = 0 and
    NDCG@10 = 0 alike."""
    # collapsed: every score ties
    q, c = torch.ones(2, 4), torch.ones(30, 4)
    pos = torch.tensor([[3, -1], [0, 7]])
    s, top = retriever.ranked_top_k(q, c, 10, positives=pos, chunk=8)        # streamed over chunks
    assert not ({3} & set(top[0].tolist()) or {0, 7} & set(top[1].tolist()))
    assert retriever.ndcg_at_k(top, [[3], [0, 7]]) == 0.0
    assert retriever.recall_mrr(retriever.ranks_of_best_positive(q, c, pos))["R@10"] == 0.0
    c2 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    # a NaN corpus vector never comes first
    c2[1] = float("nan")
    s, top = retriever.Retriever.search(torch.randn(3, 4), c2, k=6)
    assert (top[:, -1] == 1).all() and torch.isnan(s[:, -1]).all()


def test_summary_headroom_matches_teacher_forced_embeddings(world, tok):
    """eval.summary_headroom (MRBench-mini with reference / empty summaries) agrees with the
    training code's own teacher-forced embeddings (train.teacher_forced_on, summary dropout for
    the empty case)."""
    ret = tiny_model(tok)
    bench = world.mrbench_mini(3)
    got = evaluation.summary_headroom(ret, bench, nullcontext)
    for mode, drop_all in (("reference", False), ("empty", True)):
        r5 = []
        for task, (queries, pool) in bench.items():
            qi, ins = [q.item for q in queries], [data.INSTRUCTIONS[task]] * len(queries)
            eq = teacher_forced(ret, qi, ins, [drop_all] * len(qi))[0]
            ep = teacher_forced(ret, pool, [None] * len(pool), [drop_all] * len(pool))[0]
            ranks = retriever.ranks_of_best_positive(eq, ep,
                                                      evaluation.relevant_indices(task, queries,
                                                                                  pool))
            r5.append((ranks <= 5).float().mean().item())
        assert abs(got[mode] - sum(r5) / len(r5)) < 1e-6, mode


def test_summary_grains_by_hand():
    """says: a generated image summary graded grain by grain against its scene."""
    a, b = Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 1, 1)
    scene = Scene.of([a, b])
    grade = evaluation.summary_grains
    assert all(grade(scene, scene.summary()).values())                          # every grain right
    swapped = Scene.of([Obj("circle", "blue", "small", 0, 0), Obj("square", "red", "large", 1, 1)])
    g = grade(scene, swapped.summary())                       # colours swapped: a binding error
    assert g["entity"] and g["attribute"] and not g["binding"] and g["cell"] == 0.0
    places = Scene.of([Obj("circle", "red", "small", 1, 1), Obj("square", "blue", "large", 0, 0)])
    g = grade(scene, places.summary())                        # places swapped: a relation error
    assert g["binding"] and not g["relation"] and g["cell"] == 0.0 and not g["exact"]
    moved = Scene.of([Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 2, 2)])
    g = grade(scene, moved.summary())                # moved along the same diagonal: relation kept
    assert g["relation"] and g["cell"] == 0.5
    g = grade(scene, "small red circle top left")                             # an object left out
    assert not g["entity"] and not g["relation"] and g["cell"] == 0.5
    assert not any(v for k, v in grade(scene, "").items() if k != "relation")
    assert evaluation.read_summary("small red circle top left ; blue") == [
        dict(shape="circle", color="red", size="small", row=0, col=0),
        dict(shape=None, color="blue", size=None, row=None, col=None)]


def test_precondition_rows_of_blind_models(world, tok, monkeypatch):
    """A pairwise row reads 0.5 where the model cannot tell: a [RET] that ignores its input reads
    0.5 on every kind, image side and text side; a decoder that cannot see the image prefers the
    reference exactly as often under its own image as under another's (the language prior); a
    bag-of-words embedding cannot tell a binding contradiction from an entailment."""
    assert evaluation.preference([1.0, 1.0, 2.0], [1.0, 0.0, 3.0]) == 0.5
    assert evaluation.preference([float("nan")], [0.0]) == 0.0                # a broken model loses
    ret = tiny_model(tok)
    blind_ret = tiny_model(tok)
    unit = torch.nn.functional.normalize(torch.ones(blind_ret.model.cfg.d_model), dim=0)
    monkeypatch.setattr(blind_ret.model, "ret_embedding", lambda h, ret_pos: unit.expand(
        h.shape[0], -1).clone())
    bench = world.mrbench_mini(3)
    reads = evaluation.summary_headroom(blind_ret, bench, nullcontext)["reads"]
    assert set(reads) >= {"attribute", "binding", "relation"} and set(reads.values()) == {0.5}
    text = evaluation.reads_text(lambda caps: unit.expand(len(caps), -1),
                                 evaluation.text_triplets(world, 10))
    assert set(text) == {"attribute", "binding", "relation"} and set(text.values()) == {0.5}
    words = sorted({w for t in evaluation.text_triplets(world, 10).values() for trip in t
                    for c in trip for w in c.text().split()})

    def bag_of_words(caps):
        e = torch.zeros(len(caps), len(words))
        for i, c in enumerate(caps):
            for w in c.text().split():
                e[i, words.index(w)] += 1
        return torch.nn.functional.normalize(e, dim=-1)
    assert evaluation.reads_text(bag_of_words, evaluation.text_triplets(world, 10))["binding"] < 0.5
    # an image tower whose output is constant: the decoder reads every image alike
    for p in ret.model.projector[2].parameters():
        torch.nn.init.zeros_(p)
    seen = evaluation.sees(ret, world.splits["test"][:12], nullcontext)
    for kind in evaluation.SEES_KINDS:
        assert seen[kind] == seen[f"{kind} (prior)"], kind


def test_long_phases_report_progress(world, tok, monkeypatch, capsys):
    """A long embedding phase (mining, evaluation, an M-BEIR pool) prints items/s and an ETA at
    least every 10 s."""
    ret = tiny_model(tok)
    # every reading of the clock: 6 s later
    clock = iter(range(0, 10_000, 6))
    monkeypatch.setattr(retriever.time, "time", lambda: next(clock))
    items = [q.positive for q in world.sample_queries(random.Random(0), 6)]
    ret.embed_items(items, [None] * 6, batch_size=2, progress="mining: pool")
    out = capsys.readouterr().out
    assert "mining: pool: 2/6 items" in out and "items/s, eta" in out


# --------------------------------------------------------------------------------------------------
# Real data: M-BEIR in UniIR's layout and MMEB, on the repository's own sample
# (mbeir.write_mbeir_sample)


@pytest.fixture(scope="module")
def mbeir(tmp_path_factory):
    return realdata.write_mbeir_sample(tmp_path_factory.mktemp("mbeir"))


def untimed(results: dict) -> dict:
    return {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in results.items()}


def test_mbeir_reader_round_trip(tmp_path):
    img = data.render(Scene.of([Obj("circle", "red", "large", 0, 0)]), 32, 0)
    img.save(tmp_path / "a.png")
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"did": "c1", "txt": None, "img_path": "a.png", "modality": "image"},
        {"did": "c2", "txt": "a blue square", "img_path": None, "modality": "text"}]) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"qid": "q1", "query_txt": "a red circle", "query_img_path": None,
                                                  "query_modality": "text", "pos_cand_list": ["c1"]}) + "\n")
    items, pool, pos = realdata.read_mbeir(tmp_path / "q.jsonl", tmp_path / "pool.jsonl", tmp_path)
    assert items[0].text == "a red circle" and pos == [{0}] and pool[1].text == "a blue square"
    assert retriever.load_image(pool[0], 32).shape == (3, 32, 32)


def test_mbeir_reader_instructions_filter_and_modalities(mbeir):
    ins = realdata.read_mbeir_instructions(mbeir / "instructions" / "query_instructions.tsv")
    assert ins[("9", "text", "image")] == ["Retrieve an image that matches the given caption.",
                                           "Find a matching picture."]
    assert realdata.mbeir_tasks(mbeir) == ["sample_task0", "sample_task3", "samplecirr_task8"]
    q, p = realdata.mbeir_paths(mbeir, "sample_task0", pool="union")
    pool = realdata.read_mbeir_pool(p, mbeir)
    qs = realdata.read_mbeir_queries(q, pool, mbeir, ins)
    assert qs.qids[0] == "9:0" and qs.task_ids[0] == 0 and qs.modalities[0] == "text"
    # UniIR's first prompt
    assert qs.instructions[0] == "Retrieve an image that matches the given caption."
    # "8:0" is another dataset's: dropped, as UniIR does
    assert qs.positives[0] == [pool.index["9:0"]]
    # the unfiltered form
    assert realdata.read_mbeir(q, p, mbeir)[2][0] == {pool.index["9:0"], pool.index["8:0"]}
    # null and empty candidate texts are image-only items; image+text candidates keep both
    assert pool.items[pool.index["9:1"]].text == "" and pool.items[pool.index["9:0"]].text == ""
    both = pool.items[pool.index["8:3"]]
    assert both.text == "picture 3" and both.image_path.endswith("3.jpg") and pool.modalities[pool.index["8:3"]] == "image,text"
    q3, p3 = realdata.mbeir_paths(mbeir, "sample_task3")
    pool3 = realdata.read_mbeir_pool(p3, mbeir)
    qs3 = realdata.read_mbeir_queries(q3, pool3, mbeir, ins)
    assert qs3.negatives[0] == [pool3.index["9:101"]] and qs3.items[0].text == "" and qs3.items[0].image_path
    img = retriever.load_image(qs3.items[0], 36)
    assert img.shape == (3, 36, 36)                           # a non-square JPEG, resized


def test_mbeir_bad_input_names_file_and_line(mbeir, tmp_path):
    import shutil
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    ins = realdata.read_mbeir_instructions(root / "instructions" / "query_instructions.tsv")
    q, p = realdata.mbeir_paths(root, "sample_task0")
    pool = realdata.read_mbeir_pool(p, root)
    lines = q.read_text().splitlines()
    cases = [
        ('{"qid": "9:0", "query_txt": "x"', "mbeir_sample_task0_test.jsonl:2: malformed JSON"),
        (json.dumps({"qid": "9:9", "query_txt": "x", "query_img_path": None, "query_modality": "text"}),
         r"mbeir_sample_task0_test.jsonl:2: record lacks field\(s\) \['pos_cand_list'\]"),
        (json.dumps({"qid": "9:9", "query_txt": "x", "query_img_path": "gone.jpg", "query_modality": "text",
                     "pos_cand_list": ["9:1"]}), "mbeir_sample_task0_test.jsonl:2: image .*gone.jpg not found"),
        (json.dumps({"qid": "9:9", "query_txt": "x", "query_img_path": None, "query_modality": "text",
                     "pos_cand_list": ["9:777"]}), r"test.jsonl:2: positive candidate\(s\) \['9:777'\] .* not in the pool"),
        (json.dumps({"qid": "9:9", "query_txt": "x", "query_img_path": None, "query_modality": "audio",
                     "pos_cand_list": ["9:1"]}), "test.jsonl:2: no instruction for dataset 9, query modality 'audio'"),
    ]
    for bad, pattern in cases:
        q.write_text("\n".join([lines[0], bad]) + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            realdata.read_mbeir_queries(q, pool, root, ins)
    p.write_text(p.read_text() + json.dumps({"did": "9:0", "txt": "dup", "img_path": None, "modality": "text"}) + "\n")
    with pytest.raises(ValueError, match=r"cand_pool.jsonl:13: candidate id '9:0' appears twice"):
        realdata.read_mbeir_pool(p, root)


def test_mbeir_uniir_protocol(mbeir, tmp_path, tok):
    """UniIR's evaluation: every qrels positive in the pool counts (another dataset's too), a
    positive outside the pool is no error, a task's `_<split>_cand_pool` is used where it exists,
    the paper's M-BEIR score takes R@10 for the fashion tasks, and --instruction random draws
    among UniIR's prompts."""
    import shutil
    ins = realdata.read_mbeir_instructions(mbeir / "instructions" / "query_instructions.tsv")
    q, p = realdata.mbeir_paths(mbeir, "sample_task0", pool="union")
    pool = realdata.read_mbeir_pool(p, mbeir)
    qrels = realdata.read_qrels(mbeir / "qrels" / "test" / "mbeir_sample_task0_test_qrels.txt")
    qs = realdata.read_mbeir_queries(q, pool, mbeir, ins, qrels=qrels, strict=False)
    # 9:0 lists 8:0
    assert pool.index["8:0"] in qs.relevant[0] and pool.index["8:0"] not in qs.positives[0]
    # the task's split pool: only the `_test_` file present -> used, named in the results
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    local = root / "cand_pool" / "local"
    (local / "mbeir_sample_task0_cand_pool.jsonl").rename(local / "mbeir_sample_task0_test_cand_pool.jsonl")
    assert realdata.mbeir_paths(root, "sample_task0")[1].name == "mbeir_sample_task0_test_cand_pool.jsonl"
    ret = tiny_model(tok)
    res = realdata.evaluate_mbeir(ret, root, ["sample_task0"], "test", "local", nullcontext)
    assert res["sample_task0"]["pool_file"] == "mbeir_sample_task0_test_cand_pool.jsonl"
    assert res["avg"]["M-BEIR score"] == pytest.approx(res["sample_task0"]["R@5"])
    fake = {"fashioniq_task7": {"R@5": 0.1, "R@10": 0.3}, "mscoco_task0": {"R@5": 0.5, "R@10": 0.9}}
    assert realdata.mbeir_score(fake, list(fake)) == pytest.approx((0.3 + 0.5) / 2)
    drawn = realdata.read_mbeir_queries(q, pool, mbeir, ins, strict=False,
                                        instruction_rng=random.Random(1))
    assert set(drawn.instructions) == {"Retrieve an image that matches the given caption.",
                                       "Find a matching picture."}


def test_eval_mbeir_end_to_end(mbeir, world, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    run = tmp_path / "run.trec"
    args = ["--ckpt", str(tmp_path / "ck"), "--mbeir", str(mbeir), "--run_file", str(run), "--run_depth", "4",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "m.json"), "--threads", "1"]
    evaluation.main(args)
    res = json.loads((tmp_path / "m.json").read_text())
    assert set(res) == {"sample_task0", "sample_task3", "samplecirr_task8", "avg"}
    for r in res.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("R@1", "R@5", "R@10", "MRR", "NDCG@10"))
        assert r["R@1"] <= r["R@5"] <= r["R@10"]
    rows = [line.split() for line in run.read_text().splitlines()]
    # the run's name: the checkpoint's
    assert len(rows) == 18 * 4 and all(len(r) == 6 and r[1] == "Q0" and r[5] == "ck" for r in rows)
    assert [int(r[3]) for r in rows[:4]] == [1, 2, 3, 4] and float(rows[0][4]) >= float(rows[1][4])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    capsys.readouterr()
    # the second time, the pools come cached
    evaluation.main(args)
    assert capsys.readouterr().out.count("pool embeddings from the cache") == 3
    again = json.loads((tmp_path / "m.json").read_text())
    # the cached embeddings are the same
    assert untimed(again) == untimed(res)


def test_read_mbeir_train_merges_pools_and_keeps_negatives(mbeir):
    src = realdata.read_mbeir_train(mbeir, ["sample_task0", "sample_task3"], split="train",
                                    pool="local")
    # two local pools merged by id
    assert len(src.queries) == 12 and len(src.pool.items) == 24
    q = src.queries[0]
    assert q.task == "sample_task0" and q.instruction == "Retrieve an image that matches the given caption."
    assert src.pool.dids[src.positives[0][0]] == "9:0" and q.positive is src.pool.items[src.positives[0][0]]
    # task 3's neg_cand_list, as pool indices
    assert [src.pool.dids[j] for j in src.negatives[6]] == ["9:101"]
    assert "Retrieve an image that matches the given caption." in src.texts()
    with pytest.raises(ValueError, match=r"\['nights_task4'\] have no query file"):
        realdata.read_mbeir_train(mbeir, ["nights_task4"])


def test_mbeir_stage2_batch_masks_positives(mbeir):
    # union pool: ids 9:*, 8:*
    src = realdata.read_mbeir_train(mbeir, ["all"])
    args = train.get_args(["--preset", "smoke", "--mbeir", str(mbeir), "--batch_size", "16"])
    tok = retriever.train_tokenizer(src.texts(), 400)
    enc = retriever.Encoder(tok, 4, 32)
    b = realdata.make_mbeir_inputs(args, src, step=3)                       # the global batch
    part = retriever.encode_pairs(enc, 100, b.part(0, 1))
    assert part.encoded[0]["tokens"].shape[0] == 3 * 16 and b.false_neg.shape == (16, 32)
    # replay the draw: queries, then positives
    rng = random.Random(f"{args.seed}-mbeir-3")
    qi = [rng.randrange(len(src.queries)) for _ in range(16)]
    pos = [rng.choice(src.positives[i]) for i in qi]
    for k, i in enumerate(qi):
        # the query's own target stays the target
        assert not b.false_neg[k, k]
        for c, j in enumerate(pos):
            assert bool(b.false_neg[k, c]) == (c != k and j in src.positives[i])
    # the sample repeats queries: some match
    assert b.false_neg.any()


def test_train_on_mbeir_sample_end_to_end(mbeir, tmp_path):
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--mbeir", str(mbeir), "--steps", "3", "--rl_steps", "2", "--out", str(out),
                "--threads", "1", "--vocab_size", "400"])
    meta = retriever.read_checkpoint(out / "elva")[3]
    assert meta["mbeir"]["tasks"] == ["sample_task0", "sample_task3", "samplecirr_task8"] and "world" not in meta
    tok = retriever.load_tokenizer(out / "tokenizer.json")
    caption = realdata.read_mbeir_train(mbeir, ["all"]).queries[0].item.text
    # BPE merges learnt from the real text
    assert len(tok.encode(caption).ids) < len(caption.encode()) / 2
    for c in ("contrastive", "elva"):
        res = json.loads((out / f"eval_{c}.json").read_text())
        assert set(res) == {"sample_task0", "sample_task3", "samplecirr_task8", "avg"}
    with pytest.raises(SystemExit, match="--mbeir .*: expected an M-BEIR root holding query/train/"):
        train.get_args(["--mbeir", str(tmp_path)])


def test_mmeb_eval_by_hand(tmp_path):
    rows = [{"qry_inst": "", "qry_text": "q0", "qry_img_path": "", "tgt_inst": "", "tgt_text": ["a", "b", "c"],
             "tgt_img_path": []},
            {"qry_inst": "", "qry_text": "q1", "qry_img_path": "", "tgt_inst": "",
             "tgt_text": ["d", "e"],
             "tgt_img_path": []},
            {"qry_inst": "", "qry_text": "q2", "qry_img_path": "", "tgt_inst": "",
             "tgt_text": ["f", "g", "h", "i"],
             "tgt_img_path": []}]
    path = tmp_path / "toy.jsonl"
    vec = {"q0": [1, 0], "a": [1, 0], "b": [0, 1], "c": [-1, 0],        # positive first: rank 1
           # a tie with the positive: rank 2
           "q1": [1, 0], "d": [0, 1], "e": [0, 1],
           # NaN positive: last (4)
           "q2": [1, 0], "f": [float("nan"), 0], "g": [1, 0], "h": [0, 1], "i": [1, 0]}
    seen = []

    class Fake:
        def embed_items(self, items, instructions, batch_size=256, autocast=None, progress=None):
            seen.extend(it.text for it in items)
            return torch.tensor([vec[it.text] for it in items], dtype=torch.float32), []

    # VLM2Vec's image token: not fed as text
    rows[2]["qry_text"] = "<|image_1|> q2"
    # a target two rows share: embedded once
    rows[2]["tgt_text"][2] = "b"
    vec["b"] = [0, 1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = realdata.evaluate_mmeb(Fake(), [str(path)], str(tmp_path), nullcontext)
    assert seen.count("b") == 1 and "q2" in seen and not any("<|image_1|>" in t for t in seen)
    toy = res[str(path)]                                                # keyed by the path given
    assert toy["P@1"] == pytest.approx(1 / 3) and toy["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert toy["chance_P@1"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3) and toy["nonfinite"] == 1
    # the same file name in two folders: two rows, not one
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "toy.jsonl"
    twin.write_text(path.read_text())
    both = realdata.evaluate_mmeb(Fake(), [str(path), str(twin)], str(tmp_path), nullcontext)
    assert set(both) == {str(path), str(twin), "avg"}
    with pytest.raises(data.BadInput, match="given twice"):
        realdata.evaluate_mmeb(Fake(), [str(path), str(path)], str(tmp_path), nullcontext)


def test_mmeb_command_on_the_sample(mbeir, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    files = sorted(str(f) for f in (mbeir / "mmeb").glob("*.jsonl"))
    evaluation.main(["--ckpt", str(tmp_path / "ck"), "--mmeb", *files, "--mmeb_images", str(mbeir), "--threads", "1"])
    assert f"| {files[1]} | 8 |" in capsys.readouterr().out             # files[1]: sample_t2i.jsonl
    with pytest.raises(SystemExit, match="--mmeb: .*sample_i2t.jsonl:1: image .* not found"):
        evaluation.main(["--ckpt", str(tmp_path / "ck"), "--mmeb", *files, "--threads", "1"])


# --------------------------------------------------------------------------------------------------
# The Retriever (the user's API)


def test_retriever_api(world, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    r = retriever.Retriever.from_pretrained(tmp_path / "ck")
    long_text = "a red circle " * 200
    e = r.encode_text(["a red circle", long_text], instruction=data.INSTRUCTIONS["t2i"])
    assert "1 of 2 texts were cut" in capsys.readouterr().out
    assert e.shape == (2, r.model.cfg.d_model) and torch.allclose(e.norm(dim=-1), torch.ones(2),
                                                                  atol=1e-5)
    img = data.render(world.splits["test"][0], 36, 0)
    img.save(tmp_path / "a.png")
    c = r.encode_image([img, str(tmp_path / "a.png")])
    # a PIL image and its file embed alike
    assert torch.allclose(c[0], c[1], atol=1e-5)
    scores, idx = r.search(e, c, k=1)
    assert idx.shape == (2, 1) and scores.shape == (2, 1)
    # a single input gives one vector; a list (N, D); an empty list (0, D) -- the API people know
    D = r.model.cfg.d_model
    one = r.encode_text("a triangle", instruction=data.INSTRUCTIONS["t2i"])
    assert one.shape == (D,) and torch.allclose(one,
                                                r.encode_text(["a triangle"],
                                                              data.INSTRUCTIONS["t2i"])[0])
    # not one embedding per character
    assert r.encode_text("triangle").shape == (D,)
    assert r.encode_image(img).shape == (D,) and r.encode_image(str(tmp_path / "a.png")).shape == (D,)
    assert r.encode_text([]).shape == (0, D)
    composed, words = r.encode(texts=["make the circle blue", "x"], images=[img, img],
                               return_summaries=True)
    assert composed.shape == (2, D) and len(words) == 2 and all(isinstance(w, str) for w in words)
    assert isinstance(r.encode_text("a circle", return_summaries=True)[1], str)
    arr = r.encode_text(["a", "b"], convert_to_numpy=True)
    s_np, i_np = r.search(arr, c.numpy(), k=2)                         # numpy in, numpy out
    assert isinstance(i_np, np.ndarray) and i_np.shape == (2, 2)
    hits = r.search(arr[0], c.numpy(), k=2, as_hits=True)              # sentence-transformers' form
    assert len(hits) == 1 and set(hits[0][0]) == {"corpus_id", "score"}
    for bad, err in (((" ",), "text 0 is blank"), ((str(tmp_path / "gone.jpg"),), "image 0 "
                                                                                  ".*gone.jpg.* not a file"),
                     ((3,), "texts must be")):
        with pytest.raises((ValueError, FileNotFoundError, TypeError), match=err):
            if "gone" in str(bad[0]):
                r.encode_image(bad[0])
            else:
                r.encode_text(bad[0])
    r.save_pretrained(tmp_path / "saved")                              # round trip
    r2 = retriever.Retriever.from_pretrained(tmp_path / "saved")
    assert torch.allclose(r2.encode_text("a triangle"), r.encode_text("a triangle"))
    # evaluation's pools: chunks made in DataLoader workers embed to the same numbers as in-process
    qs = world.sample_queries(random.Random(0), 5)
    items, instr = [q.positive for q in qs] + [q.item for q in qs], [None] * 5 + [data.INSTRUCTIONS[q.task] for q in qs]
    e0, t0 = r.embed_items(items, instr, batch_size=3, workers=0)
    e2, t2 = r.embed_items(items, instr, batch_size=3, workers=2)
    assert torch.equal(e0, e2) and t0 == t2


# --------------------------------------------------------------------------------------------------
# What happens when things go wrong: each case gets a named one-line error, or is handled (README
# table)


SMOKE = ["--preset", "smoke", "--stages", "contrastive", "--steps", "6", "--ckpt_every", "3",
         "--no_eval"]


def test_nan_model_scores_nothing(world, tok):
    """A model with NaN weights must never score well: its embeddings rank last and the table
    counts them."""
    ret = tiny_model(tok)
    with torch.no_grad():
        for p in ret.model.parameters():
            p.fill_(float("nan"))
    out = evaluation.standard_split(ret, world, 10, nullcontext)
    assert out["avg"]["R@5"] == 0.0 and out["avg"]["R@1"] == 0.0
    assert out["nonfinite"] > 0


@pytest.mark.parametrize("flags,pattern", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--steps", "-5"], "--steps -5: expected"),
    (["--ckpt_every", "0"], "--ckpt_every 0: expected"),
    (["--log_every", "0"], "--log_every 0: expected"),
    (["--rl_batch", "0"], "--rl_batch 0: expected"),
    (["--rl_batch", "33"], "--rl_batch 33: expected <= the RL instances"),
    (["--batch_size", "1"], "--batch_size 1: expected an integer >= 2"),
    (["--tau", "1e-30"], "--tau 1e-30: expected a finite number >= 0.005 and <= 10"),
    (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    (["--rl_lr", "inf"], "--rl_lr inf: expected a finite number > 0"),
    (["--rl_lr", "nan"], "--rl_lr nan: expected"),
    (["--beta", "-1"], "--beta -1: expected a finite number >= 0"),
    (["--summary_dropout", "2"], "--summary_dropout 2: expected a finite number >= 0 and <= 1"),
    (["--group_size", "1"], "--group_size 1: expected an integer >= 2"),
    (["--threads", "0"], "--threads 0: expected"),
    (["--vocab_size", "10"], "--vocab_size 10: expected an integer >= 300"),
    (["--stages", "pretrain"], "--stages 'pretrain': expected"),
    (["--device", "tpu"], "--device 'tpu': expected"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device 'cuda': expected a "
                                                                  "device this machine has")]))
def test_bad_flags_are_named_before_any_work(flags, pattern, tmp_path):
    with pytest.raises(SystemExit, match=pattern.replace("(", r"\(").replace("+", r"\+")):
        train.get_args(["--preset", "smoke", "--out", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()


def test_out_must_be_a_writable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit, match="--out .*expected a folder"):
        train.get_args(["--preset", "smoke", "--out", str(f)])
    # a folder that cannot be made or written (here: below a file; a read-only folder fails the same
    # way, but root, as CI runs, may write anywhere)
    with pytest.raises(SystemExit, match="--out .*: expected a folder this process can write"):
        train.main(["--preset", "smoke", "--out", str(f / "run")])


def test_bad_input_errors(tmp_path, tok):
    ret = tiny_model(tok)
    with pytest.raises(ValueError, match="empty query"):
        ret.enc.prompt(Item(text="   "), "instr")
    with pytest.raises(SystemExit, match="--preset invalid choice: 'huge'"):
        train.get_args(["--preset", "huge"])
    # M-BEIR reader: malformed record, missing field, missing image
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"did": "1", "txt": "a red circle", "img_path": None, "modality": "text"}) + "\n")
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"qid": 1, "query_txt": "x"\n')
    with pytest.raises(ValueError, match="q.jsonl:1: malformed JSON"):
        realdata.read_mbeir(qf, pool)
    qf.write_text(json.dumps({"qid": 1, "query_txt": "x", "query_img_path": None, "query_modality": "text"}) + "\n")
    with pytest.raises(ValueError, match="lacks field.*pos_cand_list"):
        realdata.read_mbeir(qf, pool)
    qf.write_text(json.dumps({"qid": 1, "query_txt": "x", "query_img_path": "nope.png", "query_modality": "image",
                              "pos_cand_list": ["1"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png not found"):
        realdata.read_mbeir(qf, pool, tmp_path)
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png could not be read"):
        retriever.load_image(Item(image_path=str(bad_img)), 32)


def test_non_finite_steps_are_never_applied_or_saved(world, tok, tmp_path):
    """A non-finite loss or gradient stops the run before the update is applied; non-finite
    weights are never saved; the message names the step and the checkpoint that is kept."""
    ret = tiny_model(tok)
    model = ret.model
    run, stage = stage_of(ret, rl_args(), tmp_path, name="contrastive", steps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step(loss):   # a stage's update as train.py writes it
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stage.stop_unless_finite(0, loss, gnorm)
        stage.opt.step()
    with pytest.raises(FloatingPointError, match="contrastive step 0: the loss is nan; stopping "
                                                 "before applying it; no checkpoint"):
        step(model.tok_emb.weight.sum() * float("nan"))
    # a finite loss whose gradient is NaN (injected by a hook)
    hook = model.norm.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="gradient norm is nan; stopping before applying"):
        step(model.norm.weight.sum())
    hook.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    stage.steps = 5
    stage.save_if_due(4)
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))
    stage.steps = 6
    with pytest.raises(FloatingPointError,
                       match=r"non-finite \(norm.weight and 0 more\); not saving them; the last "
                             r"checkpoint in .* \(step 4\) is kept"):
        stage.save_if_due(5)
    assert retriever.read_checkpoint(tmp_path / "contrastive")[3]["step"] == 4


def test_the_log_writes_every_step_and_prints_every_log_every(tok, tmp_path, capsys):
    ret = tiny_model(tok)
    run, stage = stage_of(ret, rl_args("--log_every", "3"), tmp_path, name="contrastive", steps=7)
    for step in range(7):
        stage.log(step, {"loss": torch.tensor(float(step)), "lr": 0.1, "masked_false_neg": step})
        lines = (tmp_path / "contrastive" / "log.jsonl").read_text().splitlines()
        assert len(lines) == step + 1
    recs = [json.loads(x) for x in lines]
    assert [r["loss"] for r in recs] == [float(i) for i in range(7)] and recs[5]["masked_false_neg"] == 5
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("contrastive 0")]
    assert [x.split()[1] for x in printed] == ["00000/7", "00003/7", "00006/7"]


def test_checkpoint_is_whole_or_absent(world, tok, tmp_path, monkeypatch):
    """A kill during a save leaves the previous checkpoint whole (model.safetensors, renamed into
    place last, is the commit point, and names its optimizer file); --resume without its
    optimizer state is refused, naming the file; older optimizer files are removed."""
    ret = tiny_model(tok)
    folder = tmp_path / "ck"
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3)
    retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 19}, optimizer=opt)
    saved = {k: v.clone() for k, v in ret.model.state_dict().items()}
    with torch.no_grad():
        ret.model.norm.weight.add_(1.0)
    real = retriever.atomic_write

    # the new optimizer state lands, the new model.safetensors never does
    def killed_before_the_model(path, write):
        if Path(path).name == "model.safetensors":
            raise KeyboardInterrupt
        real(path, write)
    monkeypatch.setattr(retriever, "atomic_write", killed_before_the_model)
    with pytest.raises(KeyboardInterrupt):
        retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 29}, optimizer=opt)
    monkeypatch.setattr(retriever, "atomic_write", real)
    model, _, meta = retriever.load_checkpoint(folder)
    assert meta["step"] == 19 and all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert meta["optimizer"] == "optimizer-000019.pt" and (folder / meta["optimizer"]).is_file()
    # the next save removes the optimizer files it does not name
    retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 31}, optimizer=opt)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer-000031.pt"]
    # --resume without the optimizer state: refused, naming the file
    out = tmp_path / "run"
    train.main(SMOKE + ["--out", str(out)])
    (out / "contrastive" / "optimizer-000005.pt").unlink()
    with pytest.raises(SystemExit, match="optimizer-000005.pt is missing"):
        train.main(SMOKE + ["--out", str(out), "--resume", "--steps", "6"])


def test_kill_and_resume_is_byte_identical_and_logs_each_step_once(tmp_path, monkeypatch):
    a, b, c = (str(tmp_path / n) for n in "abc")
    train.main(SMOKE + ["--out", a])
    train.main(SMOKE + ["--out", c])
    # deterministic
    assert same_weights(Path(a) / "contrastive", Path(c) / "contrastive")
    real = runtime.Stage.log

    def dying(self, step, rec, *a, **k):   # killed during step 4, after the step-2 checkpoint
        if step == 4:
            raise KeyboardInterrupt
        real(self, step, rec, *a, **k)
    monkeypatch.setattr(runtime.Stage, "log", dying)
    with pytest.raises(KeyboardInterrupt):
        train.main(SMOKE + ["--out", b])
    monkeypatch.setattr(runtime.Stage, "log", real)
    train.main(SMOKE + ["--out", b, "--resume"])
    assert same_weights(Path(a) / "contrastive", Path(b) / "contrastive")
    for run in (a, b):
        steps = [json.loads(line)["step"] for line in (Path(run) / "contrastive" / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(6)), run
    # a second fresh run into the same folder is refused; with --overwrite it starts a fresh log
    with pytest.raises(SystemExit, match="holds a checkpoint of the contrastive stage .*--resume"):
        train.main(SMOKE + ["--out", a])
    train.main(SMOKE + ["--out", a, "--overwrite"])
    assert (Path(a) / "contrastive" / "log.jsonl").read_text().count("\n") == 6


def test_a_run_folder_keeps_its_world(tmp_path):
    out = str(tmp_path / "run")
    train.main(SMOKE + ["--out", out, "--steps", "1"])
    for flags, name in ((["--seed", "1"], "--seed 1: expected 0"),
                        (["--vocab_size", "400"], "--vocab_size 400: expected 512")):
        with pytest.raises(SystemExit, match=f"{name}: the folder .* holds a run made with it"):
            train.main(SMOKE + ["--out", out, "--steps", "1", *flags])
    train.main(SMOKE + ["--out", out, "--steps", "1", "--vocab_size", "400", "--overwrite"])
    assert retriever.load_tokenizer(Path(out) / "tokenizer.json").get_vocab_size() <= 400
    assert retriever.load_checkpoint(Path(out) / "contrastive")[0].cfg.vocab_size <= 400


def test_eval_inputs_are_checked(world, tok, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    ret = tiny_model(tok)
    # a checkpoint of another world (no GrainWorld in its record)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"step": 0})
    with pytest.raises(SystemExit, match="expected one trained on GrainWorld"):
        evaluation.evaluate(str(tmp_path / "ck"), 5, 2, "cpu", nullcontext)
    path = tmp_path / "ck" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    cfg = {**json.loads(header["config"]), "n_layers": 3}
    save_file(load_file(str(path)), str(path), {**header, "config": json.dumps(cfg)})
    # the details, not cut off
    with pytest.raises(ValueError, match="do not match the config saved with them .*blocks.2"):
        retriever.load_checkpoint(tmp_path / "ck")


def test_eval_names_the_stage_folders_of_a_run_folder(tmp_path, tok):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "run" / "contrastive", ret.model, tok,
                            {"world": {}, "step": 0})
    with pytest.raises(SystemExit):
        evaluation.main(["--ckpt", str(tmp_path / "run")])
    assert train.get_args(["--margin_weight", "0.3", "--rank_weight", "0.7"]).epsilon == 0.7


def test_threads_follow_the_cores_this_process_may_use(monkeypatch, capsys):
    """--threads, else OMP_NUM_THREADS (torchrun sets 1), else the cores this process may use
    divided by the processes torchrun started on the machine: two processes at two threads each
    on two cores ran 9x slower."""
    import os
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert runtime.set_threads(None) == cores == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.set_threads(None) == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.set_threads(None) == 1 and "from OMP_NUM_THREADS" in capsys.readouterr().out
        assert runtime.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# Runs, caches and results that say what they are made of; inputs refused before the work (each test
# fails on the code before these checks)


def test_the_sample_writer_writes_only_where_nothing_is(tmp_path):
    real = tmp_path / "mbeir_root"
    real.mkdir()
    (real / "query").mkdir()                                             # a real M-BEIR root, say
    with pytest.raises(data.BadInput, match="--sample .*mbeir_root: expected a new or empty folder"):
        realdata.write_mbeir_sample(real)
    assert sorted(p.name for p in real.iterdir()) == ["query"]           # nothing written
    assert (realdata.write_mbeir_sample(tmp_path / "new") / "instructions").is_dir()


def printed_by(argv) -> str:
    """What train.main prints."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train.main(argv)
    return buf.getvalue()


def test_a_run_folder_is_one_run(tmp_path):
    """--resume continues a stage only with the flags it was made with; a fresh run does not write
    over a finished stage; --overwrite starts the first stage and every later one afresh; a stage
    whose input stage changed is never 'already complete'."""
    out = str(tmp_path / "run")
    base = ["--preset", "smoke", "--stages", "contrastive,elva", "--steps", "3", "--rl_steps", "1",
            "--no_eval", "--out", out]
    train.main(base)
    for flags, name, old in ((["--steps", "5"], "--steps 5", "3"), (["--lr", "0.05"], "--lr 0.05", "0.002"),
                             (["--beta", "0.1"], "--beta 0.1", "0.2")):
        with pytest.raises(SystemExit, match=f"{name}: expected {old}, the value the .* checkpoint"):
            train.main(base + ["--resume", *flags])
    # a stage compares its own flags only: stage 3's do not stop stage 2 (the stage 3 it resumes
    # then refuses them)
    with pytest.raises(SystemExit, match="--rl_lr 0.0001: expected 1e-05, the value the elva"):
        train.main(base + ["--resume", "--rl_lr", "1e-4"])
    assert "contrastive: already complete" in printed_by(base[:3] + ["contrastive"] + base[4:]
                                                              + ["--resume", "--rl_lr", "1e-4"])
    with pytest.raises(SystemExit, match="holds a checkpoint of the contrastive stage"):
        train.main(base + ["--lr", "0.01"])
    with pytest.raises(SystemExit, match="--overwrite True: expected without --resume"):
        train.main(base + ["--resume", "--overwrite"])
    elva_weights = (Path(out) / "elva" / "model.safetensors").read_bytes()
    train.main(["--preset", "smoke", "--stages", "contrastive", "--steps", "2", "--no_eval", "--out",
                # stage 2 afresh, and stage 3 gone
                out, "--overwrite", "--lr", "0.01"])
    assert not (Path(out) / "elva").exists()
    assert retriever.read_checkpoint(Path(out) / "contrastive")[3]["args"]["lr"] == 0.01
    assert elva_weights
    # a stage 3 whose stage 2 (--init, another folder) was trained again is not complete: refused
    rl = ["--preset", "smoke", "--stages", "elva", "--rl_steps", "1", "--no_eval", "--init",
          str(Path(out) / "contrastive"), "--out", str(tmp_path / "rl")]
    train.main(rl)
    train.main(["--preset", "smoke", "--stages", "contrastive", "--steps", "3", "--no_eval", "--out",
                out, "--overwrite"])
    with pytest.raises(SystemExit, match="the elva stage's input .*changed since"):
        train.main(rl + ["--resume"])


def test_the_pool_cache_is_keyed_by_the_images(mbeir, tok, tmp_path, capsys):
    """Swap two pool images: the cached embeddings are not reused (they were made of other
    bytes)."""
    import shutil
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    args = ["--ckpt", str(tmp_path / "ck"), "--mbeir", str(root), "--tasks", "sample_task0",
            "--cache", str(tmp_path / "cache"), "--threads", "1", "--out", str(tmp_path / "r.json")]
    evaluation.main(args)
    assert "pool embeddings cached in" in capsys.readouterr().out         # its place is printed
    a, b = root / "mbeir_images/sample/0.jpg", root / "mbeir_images/sample/1.jpg"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    evaluation.main(args)
    assert "from the cache" not in capsys.readouterr().out               # re-embedded


def test_inputs_are_refused_before_the_work(mbeir, tok, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--n_hard \\+ --n_rand 1002: expected fewer than the 40"):
        train.get_args(["--preset", "smoke", "--n_hard", "1000"])
    with pytest.raises(SystemExit, match="--batch_size 100000: expected at most the 400 training"):
        train.get_args(["--preset", "smoke", "--batch_size", "100000"])
    out = tmp_path / "run"
    with pytest.raises(data.BadInput, match="--eval_tasks nope: unknown task"):
        train.main(["--preset", "smoke", "--mbeir", str(mbeir), "--eval_tasks", "nope", "--out", str(out)])
    assert not out.exists()                                              # before any training
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    for flag in ("--out", "--grid", "--run_file"):
        with pytest.raises(SystemExit, match=f"{flag} /missing/folder/x.json: expected a file in a"):
            evaluation.main(["--ckpt", str(tmp_path / "ck"), flag, "/missing/folder/x.json"])
    with pytest.raises(SystemExit, match="--queries 0: expected an integer >= 1"):
        evaluation.main(["--ckpt", str(tmp_path / "ck"), "--queries", "0"])
    # a broken image in a pool: named before anything is embedded
    import shutil
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    (root / "mbeir_images/sample/7.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.BadInput, match="image .*7.jpg could not be read"):
        realdata.read_mbeir_pool(realdata.mbeir_paths(root, "sample_task0")[1], root)


def test_mbeir_defects_of_the_review(mbeir, tmp_path, tok):
    """An empty reference summary is no tokens; a query none of whose positives is in the pool is
    a miss, counted (UniIR), not an error; qrels relevance > 0 is relevant; an empty qrels file
    is named."""
    assert tiny_model(tok).enc.summary("") == [] and tiny_model(tok).enc.summary(" ") == []
    ins = realdata.read_mbeir_instructions(mbeir / "instructions" / "query_instructions.tsv")
    q, p = realdata.mbeir_paths(mbeir, "sample_task0")
    pool = realdata.read_mbeir_pool(p, mbeir)
    small = realdata.MBeirPool(pool.path, pool.items[1:], pool.dids[1:], pool.modalities[1:],
                               {d: i for i, d in enumerate(pool.dids[1:])})     # 9:0 is not in it
    qs = realdata.read_mbeir_queries(q, small, mbeir, ins, strict=False)
    assert qs.missed == 1 and qs.relevant[0] == [] and qs.instructions[0]
    qrels = tmp_path / "q.txt"
    qrels.write_text("9:0 0 9:0 1 0\n9:1 0 9:1 0 0\n9:2 0 9:2 0.5 0\n9:3 0 9:3 -1 0\n")
    assert realdata.read_qrels(qrels) == {"9:0": ["9:0"], "9:2": ["9:2"]}
    qrels.write_text("")
    with pytest.raises(data.BadInput, match="q.txt: no relevant pair"):
        realdata.read_qrels(qrels)


def test_smaller_failures_are_named(world, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    ck = tmp_path / "ck"
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3)
    retriever.save_checkpoint(ck, ret.model, tok, {"world": {}, "step": 0}, optimizer=opt)
    # inference needs no optimizer state; a training checkpoint folder is not written over
    (ck / "optimizer-000000.pt").unlink()
    r = retriever.Retriever.from_pretrained(ck)
    with pytest.raises(data.BadInput, match="save_pretrained: .* is not empty"):
        r.save_pretrained(ck)
    # a file that is not a checkpoint's: one line
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_text("{}")
    with pytest.raises(data.BadInput, match="damaged or not a checkpoint of train.py"):
        retriever.load_checkpoint(tmp_path / "x")
    # the API's arguments
    e = r.encode_text(["a red circle", "a blue square"])
    for k in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="search: k"):
            r.search(e, e, k=k)
    with pytest.raises(ValueError, match="batch_size 0"):
        r.encode_text("a circle", batch_size=0)
    with pytest.raises(TypeError, match="instruction is a int"):
        r.encode_text("a circle", instruction=5)
    if not torch.cuda.is_available():
        with pytest.raises(data.BadInput, match="device 'cuda': torch sees no CUDA GPU"):
            retriever.Retriever.from_pretrained(tmp_path / "nowhere", device="cuda")
    # a log cut short by a power loss: --resume drops its last line and goes on
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for _, r in retriever.read_log(log)] == [0, 1]
    assert "its last line is cut short" in capsys.readouterr().out
    log.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(data.BadInput, match="log.jsonl:2: not a JSON record"):
        retriever.read_log(log)


def test_errors_of_the_command_lines_are_one_line(tmp_path, mbeir):
    """A bad input to any command line is one line on stderr, no traceback (a traceback is for
    bugs)."""
    import subprocess
    import sys
    here = Path(__file__).parent
    bad_ckpt = tmp_path / "ck"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{}")
    cases = [["eval.py", "--ckpt", str(bad_ckpt)], ["mbeir.py", "--sample", str(mbeir)],
             ["train.py", "--steps", "0"],
             ["eval.py", "--ckpt", str(mbeir), "--mbeir", str(mbeir)]]
    for argv in cases:
        run = subprocess.run([sys.executable, *argv], cwd=here, capture_output=True, text=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert run.returncode != 0, argv
        lines = [x for x in run.stderr.splitlines() if x.strip()]
        assert "Traceback" not in run.stderr and len(lines) <= 2, (argv, run.stderr)


def test_a_smoke_run_says_its_numbers_check_the_plumbing(tmp_path, capsys):
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "1", "--steps", "1",
                "--no_eval", "--threads", "1", "--out", str(tmp_path / "r")])
    assert "check the plumbing, not the method" in capsys.readouterr().out
