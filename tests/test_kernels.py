"""The Triton kernels against their torch references (Triton's interpreter on a CPU)."""


import pytest
import torch

import kernels
import reward
from tests.helpers import (dense_best_positive_ranks, DEVICES, DEVICE)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,D,ties", [(70, 300, 37, True), (5, 129, 16, False),
                                        (65, 1000, 100, False)])
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
