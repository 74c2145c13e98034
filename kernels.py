"""
Hand-written Triton kernels for the rollout's ranked list and for ranking a corpus, each beside its
torch reference.

    python kernels.py          # each kernel against its reference (CUDA: do_bench; CPU: small
                               # sizes, the Triton rows through Triton's interpreter)
    python kernels.py --sweep  # CUDA: also corpus_ranks over a few tile shapes

- cosine_ranks(q [R, D], c [R, C, D]) -> (scores [R, C], ranks [R, C]): every rollout's ranked
  list (Section 3.4; R = B*G rollouts, C = 1 + N candidates) in one kernel: L2 normalisation
  fused in, fp32 accumulation, the scores ranked in registers (reward.descending_ranks's ranks;
  with positive_last, the positive's by the tie rule of reward.py).
- corpus_ranks(q [M, D], corpus [N, D], positives [M] or [M, P]) -> int64 [M]: evaluation's rank
  of each query's best positive over a pool, by the same tie rule (a collapsed model gets the
  worst rank). The positives are scored by the very tile arithmetic of every other score, so a
  duplicate of the positive ties it exactly; a NaN positive ranks last. Tiles stream through
  tl.dot and are counted: memory O(M*P + N*D), never the [M, N] score matrix.

backend = "auto" (Triton on CUDA tensors, else the reference) | "triton" | "torch"; "triton" on CPU
tensors runs Triton's interpreter (TRITON_INTERPRET=1, set here when there is no CUDA device).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from reward import descending_ranks

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede `import triton`
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the torch references still work
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# norm floor: a zero vector scores 0 with everything instead of NaN (as F.normalize)
EPS = 1e-8


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed")
    if not on_cuda and not INTERPRET:
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    return True


# ==================================================================================================
# 1. cosine_ranks: a rollout's scores and their ranks


def cosine_scores_ref(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """q [R, D], c [R, C, D] -> [R, C] cosines. Memory traffic: reads q and c, but writes and
    re-reads normalised fp32 copies of both (c is the big one: R*C*D*4 bytes twice more) before a
    batched matrix-vector product."""
    qn = q.float() / q.float().norm(dim=-1, keepdim=True).clamp(min=EPS)            # (R, D)
    cn = c.float() / c.float().norm(dim=-1, keepdim=True).clamp(min=EPS)            # (R, C, D)
    return torch.bmm(cn, qn[:, :, None])[..., 0]                                    # (R, C)


def cosine_ranks_ref(q: torch.Tensor, c: torch.Tensor, positive_last: bool = False):
    """Reference: cosine_scores_ref, then reward.descending_ranks (each sort reads and writes
    values and indices several times: O(C log C) passes per row). positive_last: rank column 0 as
    if it stood after the last column (the reward's pessimistic rule: a negative that ties the
    positive ranks above it)."""
    s = cosine_scores_ref(q, c)                                                     # (R, C)
    if not positive_last:
        return s, descending_ranks(s)
    moved = descending_ranks(torch.cat([s[:, 1:], s[:, :1]], dim=1))
    return s, torch.cat([moved[:, -1:], moved[:, :-1]], dim=1)


if HAS_TRITON:
    @triton.jit
    def _row_cosines(q_ptr, c_ptr, r, offs_c, C, D, stride_qr, stride_cr, stride_cc,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        # the cosines of row r's query with its candidates offs_c: D in BLOCK_D chunks, dot
        # products and both squared norms in fp32, every input byte read once.
        dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
        cc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        qq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            qv = tl.load(q_ptr + r * stride_qr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            cv = tl.load(c_ptr + r * stride_cr + offs_c[:, None] * stride_cc + offs_d[None, :],
                         mask=(offs_c[:, None] < C) & (offs_d[None, :] < D), other=0.0)
            cv = cv.to(tl.float32)
            dot += tl.sum(cv * qv[None, :], axis=1)
            cc += tl.sum(cv * cv, axis=1)
            qq += qv * qv
        qn = tl.maximum(tl.sqrt(tl.sum(qq, axis=0)), 1e-8)
        cn = tl.maximum(tl.sqrt(cc), 1e-8)
        return dot / (qn * cn)                                                      # (BLOCK_C,)

    @triton.jit
    def _above(si, sj, order_i, order_j, j_ok):
        # per element i, how many of the elements j rank above it: a larger number, or any number
        # above a NaN; or a tie (two equal numbers, two NaNs) earlier in the tie order. All pairs
        # compared in registers: for a rollout (C ~ 100) one pass, no sort, no index writes.
        ni, nj = si[:, None] != si[:, None], sj[None, :] != sj[None, :]     # NaN masks (NaN != NaN)
        gt = (~nj & ~ni & (sj[None, :] > si[:, None])) | (~nj & ni)
        tie = ((sj[None, :] == si[:, None]) | (nj & ni)) & (order_j[None, :] < order_i[:, None])
        return tl.sum(((gt | tie) & j_ok[None, :]).to(tl.int32), axis=1)

    @triton.jit
    def _cosine_ranks_kernel(q_ptr, c_ptr, s_ptr, rank_ptr,                        # pointers
                             C, D,                                                  # sizes
                             stride_qr, stride_cr, stride_cc, stride_sr, stride_kr,   # strides
                             POS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: one rollout row, all of its C <= BLOCK_C candidates. The scores never leave
        # the registers before they are ranked: one read of q and c, one write, one launch.
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        s = _row_cosines(q_ptr, c_ptr, r, offs, C, D, stride_qr, stride_cr, stride_cc, BLOCK_C,
                         BLOCK_D)
        tl.store(s_ptr + r * stride_sr + offs, s, mask=offs < C)
        # tie order: the column index; with POS_LAST, column 0 counts as C
        order = tl.where((offs == 0) & POS_LAST, C, offs)
        rank = _above(s, s, order, order, offs < C) + 1
        tl.store(rank_ptr + r * stride_kr + offs, rank.to(tl.int64), mask=offs < C)


def cosine_ranks(q: torch.Tensor, c: torch.Tensor, positive_last: bool = False,
                 backend: str = "auto",
                 num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, D], c [R, C, D] -> (scores [R, C] float32, ranks [R, C] int64) in one kernel (C <=
    256: a rollout's candidate list; longer lists take the reference). positive_last: column 0 is
    the positive and ties rank it below every equal negative, so ranks[:, 0] is the reward's
    pessimistic rank of the positive."""
    if q.dim() != 2 or c.dim() != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1]:
        raise ValueError(f"cosine_ranks expects q [R, D] and c [R, C, D], got {tuple(q.shape)} and "
                         f"{tuple(c.shape)}")
    if not _use_triton(backend, q, c) or c.shape[1] > 256:
        return cosine_ranks_ref(q, c, positive_last)
    q, c = q.contiguous(), c.contiguous()
    R, C, D = c.shape
    scores = torch.empty(R, C, device=q.device, dtype=torch.float32)
    ranks = torch.empty(R, C, device=q.device, dtype=torch.int64)
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_D = min(64 if BLOCK_C > 64 else 128, triton.next_power_of_2(D))
    strides = (q.stride(0), c.stride(0), c.stride(1), scores.stride(0), ranks.stride(0))
    _cosine_ranks_kernel[(R,)](q, c, scores, ranks, C, D, *strides, POS_LAST=positive_last,
                               BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return scores, ranks


# ==================================================================================================
# 2. corpus_ranks: the rank of each query's best positive over a whole pool


def _positive_lists(pos_index: torch.Tensor, M: int, N: int) -> torch.Tensor:
    """[M] or [M, P] positives (-1 pads a shorter list) -> int64 [M, P], checked."""
    if pos_index.dim() == 1:
        pos_index = pos_index[:, None]
    if pos_index.dim() != 2 or pos_index.shape[0] != M:
        raise ValueError(f"pos_index must be [M] or [M, P] with M = {M} (the queries), got "
                         f"{tuple(pos_index.shape)}")
    pos_index = pos_index.to(torch.int64).contiguous()
    if pos_index.numel() and (int(pos_index.min()) < -1 or int(pos_index.max()) >= N):
        raise ValueError(f"pos_index must lie in [0, {N}) (the corpus size), -1 padding a shorter "
                         "list")
    if M and not bool((pos_index >= 0).any(1).all()):
        raise ValueError("pos_index: every query needs at least one positive (a row of -1 has "
                         "none)")
    return pos_index


def _inverse_norms(corpus: torch.Tensor) -> torch.Tensor:
    """[N, D] -> fp32 [N]: 1 / max(|c_n|, EPS). One pass over the corpus, shared by every query
    block (the kernel would otherwise recompute each norm once per block of queries, on the CUDA
    cores beside the tensor cores)."""
    return 1.0 / corpus.float().norm(dim=-1).clamp(min=EPS)


def corpus_ranks_ref(q: torch.Tensor, corpus: torch.Tensor, pos_index: torch.Tensor,
                     chunk: int = 65536):
    """Reference, chunked so that it never holds [M, N]: it writes each [M, chunk] score block
    to memory and reads it back -- the traffic the kernel saves. Only dot(q, c) / |c| matters
    for the order; the positives are scored by pass 2's very arithmetic, so that a duplicate
    of the positive ties it bit for bit."""
    pos = _positive_lists(pos_index, q.shape[0], corpus.shape[0]).to(q.device)      # (M, P)
    inv_norm = _inverse_norms(corpus)                                            # (N,), both passes
    # (M,); NaN propagates
    best = _positive_scores_ref(q, corpus, inv_norm, pos, chunk).max(dim=1).values
    return _count_ref(q, corpus, inv_norm, pos, best, chunk) + 1


def _chunk_scores(q, corpus, inv_norm, n0, chunk):
    return (q @ corpus[n0:n0 + chunk].T).float() * inv_norm[n0:n0 + chunk]          # (M, n)


def _positive_scores_ref(q, corpus, inv_norm, pos, chunk: int = 65536) -> torch.Tensor:
    """Pass 1: (M, P) scores of the positives found in this corpus (-inf for padding and those
    not in it)."""
    s_pos = torch.full(pos.shape, float("-inf"), device=q.device)                    # (M, P)
    for n0 in range(0, corpus.shape[0], chunk):
        inside = (pos >= n0) & (pos < n0 + chunk)                                    # (M, P)
        if inside.any():
            s = _chunk_scores(q, corpus, inv_norm, n0, chunk)
            m, j = inside.nonzero(as_tuple=True)
            s_pos[m, j] = s[m, pos[m, j] - n0]
    return s_pos


def _count_ref(q, corpus, inv_norm, pos, best, chunk: int = 65536) -> torch.Tensor:
    """Pass 2: per query, the non-positive candidates scoring at or above `best` (a NaN best: all
    count)."""
    count = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    for n0 in range(0, corpus.shape[0], chunk):
        s = _chunk_scores(q, corpus, inv_norm, n0, chunk)                            # (M, n)
        above = (s >= best[:, None]) | torch.isnan(best)[:, None]
        inside = (pos >= n0) & (pos < n0 + s.shape[1])
        m, j = inside.nonzero(as_tuple=True)
        above[m, pos[m, j] - n0] = False                                     # positives never count
        count += above.sum(1)
    return count


if HAS_TRITON:
    @triton.jit
    def _corpus_tile(q_ptr, c_ptr, inv_ptr, offs_m, m_ok, n0, N, D, stride_qm, stride_cn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                     SUM_DOT: tl.constexpr):
        # The scores of BLOCK_M queries against the corpus tile [n0, n0 + BLOCK_N): dot products
        # with tl.dot (tensor cores) over BLOCK_K slices of D, scaled by the precomputed 1/|c|. Both
        # kernels below call this one function, so a positive's score and every other score come
        # from identical arithmetic.
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((offs_m.shape[0], BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = offs_k < D
            qv = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :],
                         mask=m_ok[:, None] & km[None, :], other=0.0)
            cv = tl.load(c_ptr + offs_n[:, None] * stride_cn + offs_k[None, :],
                         mask=n_ok[:, None] & km[None, :], other=0.0)
            if SUM_DOT:  # the interpreter: numpy's matmul may sum columns in different orders
                acc += tl.sum(qv[:, None, :] * cv[None, :, :], axis=2)
            elif IEEE:  # fp32 inputs: exact fp32 products (the default would round them to tf32)
                acc += tl.dot(qv, tl.trans(cv), input_precision="ieee")
            else:
                acc += tl.dot(qv, tl.trans(cv))
        inv = tl.load(inv_ptr + offs_n, mask=n_ok, other=0.0)
        return acc * inv[None, :], offs_n, n_ok                                     # cosines * |q|

    @triton.jit
    def _positive_scores_kernel(q_ptr, c_ptr, inv_ptr, pos_ptr, out_ptr,      # pointers
                                M, N, D, P,                                   # sizes
                                stride_qm, stride_cn,                         # strides
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                IEEE: tl.constexpr, SUM_DOT: tl.constexpr):
        # grid (M blocks, corpus tiles). Pass 1: a program scores its tile only if the tile holds a
        # positive of one of its queries (at most M * P of the N / BLOCK_N tiles do any work), and
        # writes their scores.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        n0 = tl.program_id(1) * BLOCK_N
        hits = 0
        for j in range(P):
            pj = tl.load(pos_ptr + offs_m * P + j, mask=m_ok, other=-1)
            hits += tl.sum(((pj >= n0) & (pj < n0 + BLOCK_N)).to(tl.int32), axis=0)
        if hits > 0:
            s, offs_n, n_ok = _corpus_tile(q_ptr, c_ptr, inv_ptr, offs_m, m_ok, n0, N, D, stride_qm,
                                           stride_cn, BLOCK_N, BLOCK_K, IEEE, SUM_DOT)
            for j in range(P):
                pj = tl.load(pos_ptr + offs_m * P + j, mask=m_ok, other=-1)
                here = (pj >= n0) & (pj < n0 + BLOCK_N) & m_ok
                # one score (x + 0)
                sp = tl.sum(tl.where(offs_n[None, :] == pj[:, None], s, 0.0), axis=1)
                tl.store(out_ptr + offs_m * P + j, sp, mask=here)

    @triton.jit
    def _corpus_kernel(q_ptr, c_ptr, inv_ptr, pos_ptr, best_ptr, count_ptr,   # pointers
                       M, N, D, P, n_per_split,                               # sizes
                       stride_qm, stride_cn,                                  # strides
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr, SUM_DOT: tl.constexpr):
        # grid (M blocks, corpus splits). Pass 2: a program owns BLOCK_M queries and a contiguous
        # slice of the corpus; it streams that slice in BLOCK_N tiles and keeps only a count per
        # query of the non-positive candidates scoring at or above the query's best positive. Counts
        # from different splits meet in one atomic add per query and program.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        best = tl.load(best_ptr + offs_m, mask=m_ok, other=0.0)
        best_nan = best != best
        count = tl.zeros((BLOCK_M,), dtype=tl.int32)
        n_start = tl.program_id(1) * n_per_split
        for n0 in range(n_start, tl.minimum(n_start + n_per_split, N), BLOCK_N):
            s, offs_n, n_ok = _corpus_tile(q_ptr, c_ptr, inv_ptr, offs_m, m_ok, n0, N, D, stride_qm,
                                           stride_cn, BLOCK_N, BLOCK_K, IEEE, SUM_DOT)
            above = ((s >= best[:, None]) | best_nan[:, None]) & n_ok[None, :]
            for j in range(P):   # the query's own positives never count
                pj = tl.load(pos_ptr + offs_m * P + j, mask=m_ok, other=-1)
                above = above & (offs_n[None, :] != pj[:, None])
            count += tl.sum(above.to(tl.int32), axis=1)
        tl.atomic_add(count_ptr + offs_m, count, mask=m_ok)


def corpus_ranks(q: torch.Tensor, corpus: torch.Tensor, pos_index: torch.Tensor,
                 backend: str = "auto",
                 block_m: int = 256, block_n: int = 128, num_warps: int = 16, num_stages: int = 3
                 ) -> torch.Tensor:
    """q [M, D], corpus [N, D], pos_index [M] or [M, P] int64 (each query's positives, -1 pads)
    -> int64 [M]: 1 + #{n not a positive: cos(q, c_n) >= the best positive's cosine}; Recall@K
    is rank <= K. The default tile (256 x 128, 16 warps): the fastest of --sweep on an H100."""
    if q.dim() != 2 or corpus.dim() != 2 or q.shape[1] != corpus.shape[1]:
        raise ValueError(f"corpus_ranks expects q [M, D] and corpus [N, D], got {tuple(q.shape)}, "
                         f"{tuple(corpus.shape)}")
    pos = _positive_lists(pos_index, q.shape[0], corpus.shape[0])
    if not _use_triton(backend, q, corpus, pos_index):
        return corpus_ranks_ref(q, corpus, pos)
    q, corpus, pos = q.contiguous(), corpus.contiguous(), pos.to(q.device).contiguous()
    (M, D), N, P = q.shape, corpus.shape[0], pos.shape[1]
    inv_norm = _inverse_norms(corpus)                                            # (N,), both passes
    block_k = min(64, max(16, triton.next_power_of_2(D)))                   # D slice of each tl.dot
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=q.dtype == torch.float32,
                 SUM_DOT=not q.is_cuda, num_warps=num_warps, num_stages=num_stages)
    m_blocks = triton.cdiv(M, block_m)
    # pass 1: the positives' scores (-inf pads) from the tiles that hold them, then each query's
    # best positive score
    s_pos = torch.full((M, P), float("-inf"), device=q.device, dtype=torch.float32)
    _positive_scores_kernel[(m_blocks, triton.cdiv(N, block_n))](
        q, corpus, inv_norm, pos, s_pos, M, N, D, P, q.stride(0), corpus.stride(0), **tiles)
    best = s_pos.max(dim=1).values.contiguous()                               # (M,); NaN propagates
    # pass 2: counts of non-positives at or above the best. Enough corpus splits to give every SM a
    # few programs, each split a whole number of tiles (so tiles start at multiples of block_n, as
    # in pass 1).
    count = torch.zeros(M, device=q.device, dtype=torch.int32)
    n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    splits = max(1, min(triton.cdiv(N, block_n), triton.cdiv(4 * n_sm, m_blocks)))
    n_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    _corpus_kernel[(m_blocks, triton.cdiv(N, n_per_split))](
        q, corpus, inv_norm, pos, best, count, M, N, D, P, n_per_split, q.stride(0),
        corpus.stride(0), **tiles)
    return count.to(torch.int64) + 1


# ==================================================================================================
# Benchmark


def _time(fn, cuda: bool, reps: int = 5, graph: bool = False) -> float:
    """Median milliseconds: on CUDA triton.testing.do_bench (CUDA events around each call, so the
    host's launch time counts when the kernel is shorter), or with graph=True the replays of a
    captured CUDA graph (GPU time alone); a plain timer elsewhere."""
    if cuda:
        if graph:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def benchmark(sweep: bool = False):
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name} | triton: {'interpreter' if INTERPRET else 'compiled'} | torch "
          f"{torch.__version__}")
    # an idle GPU sits at a low clock: warm it for a second
    if cuda:
        a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
        t_end = time.perf_counter() + 1.0
        while time.perf_counter() < t_end:
            a @ a
        torch.cuda.synchronize()
    rows = []
    # rollout sizes (the interpreter gets a slice). On CUDA each row is timed per call (launch
    # cost included, as in training) and as CUDA-graph replays (the GPU's own time).
    R, C, D = (512, 101, 256) if cuda else (16, 101, 256)
    q = torch.randn(R, D, device=dev)
    c = torch.randn(R, C, D, device=dev)
    gb = (q.numel() + c.numel()) * 4 / 1e9
    for graph in ([False, True] if cuda else [False]):
        tag = " (graph)" if graph else ""
        ref = _time(lambda: descending_ranks(torch.bmm(c, q[:, :, None])[..., 0]), cuda,
                    graph=graph)
        fused = _time(lambda: cosine_ranks(q, c, positive_last=True, backend="triton"), cuda,
                      graph=graph)
        rows.append((f"cosine_ranks R={R} C={C} D={D} vs bmm + sort{tag}", ref, fused,
                     f"{gb / fused * 1e3:.1f} GB/s"))
    # corpus sizes (the interpreter gets a slice)
    M, N, D = (4096, 1_000_000, 256) if cuda else (64, 2048, 64)
    dt = torch.bfloat16 if cuda else torch.float32
    qc = torch.randn(M, D, device=dev, dtype=dt)
    corpus = torch.randn(N, D, device=dev, dtype=dt)
    pos = torch.randint(0, N, (M,), device=dev)
    flops = 2 * M * N * D
    ref_c = _time(lambda: corpus_ranks(qc, corpus, pos, backend="torch"), cuda)
    tri_c = _time(lambda: corpus_ranks(qc, corpus, pos, backend="triton"), cuda)
    rate = f"{flops / tri_c / 1e9:.1f} TFLOP/s"
    if cuda:
        mm = _time(lambda: qc @ corpus.T, cuda)
        rate += f" (torch.mm {flops / mm / 1e9:.1f} TFLOP/s = {mm / tri_c * 100:.0f}% ceiling)"
    rows.append((f"corpus_ranks M={M} N={N} D={D} {str(dt)[6:]}", ref_c, tri_c, rate))
    print(f"| {'kernel':52s} | {'torch ms':>9s} | {'triton ms':>9s} | {'speed-up':>8s} | rate")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 11}|{'-' * 10}|------")
    for label, r_ms, t_ms, rate in rows:
        print(f"| {label:52s} | {r_ms:9.3f} | {t_ms:9.3f} | {r_ms / t_ms:7.2f}x | {rate}")
    if sweep and cuda:
        tile_sweep(qc, corpus, pos, mm)
    if not cuda:
        print("(CPU: the Triton column is Triton's *interpreter*, a correctness tool, so its "
              "times mean nothing; run on a CUDA machine for the real comparison)")


def tile_sweep(qc, corpus, pos, mm: float):
    """corpus_ranks over a few tile shapes (the default first). In bf16 the reference rounds
    every score to bf16 before comparing, the kernel compares fp32 accumulators: a few ranks
    out of a million differ (on fp32 they agree exactly); the last columns count them."""
    ref = corpus_ranks(qc[:512], corpus, pos[:512], backend="torch")
    print(f"\ncorpus_ranks tile sweep (M={qc.shape[0]} N={corpus.shape[0]} D={qc.shape[1]}; "
          f"torch.mm {mm:.3f} ms)")
    print("| BLOCK_M | BLOCK_N | warps | stages | ms | % of torch.mm | queries != ref (of 512) | "
          "max |diff| |")
    for bm, bn, w, st in [(256, 128, 16, 3), (64, 128, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3),
                          (256, 128, 8, 4), (256, 64, 8, 4), (128, 256, 8, 3), (128, 64, 4, 4)]:
        kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
        try:
            d = (corpus_ranks(qc[:512], corpus, pos[:512], **kw) - ref).abs()
            t = _time(lambda: corpus_ranks(qc, corpus, pos, **kw), True)
            print(f"| {bm} | {bn} | {w} | {st} | {t:.3f} | {mm / t * 100:.0f}% | "
                  f"{int((d > 0).sum())} | {int(d.max())} |")
        except Exception as e:  # e.g. out of shared memory or registers for the larger tiles
            print(f"| {bm} | {bn} | {w} | {st} | failed: {type(e).__name__}: {str(e)[:80]} |")


if __name__ == "__main__":
    benchmark(sweep="--sweep" in sys.argv)
