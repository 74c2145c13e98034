"""
Evaluation: Recall@K / MRR on the four tasks, MRBench-mini, near-miss grain blindness, the
grain-masking probe and the summary-swap diagnostic, for one or several checkpoints side by side.

    python eval.py --ckpt runs/cpu/contrastive --ckpt runs/cpu/elva [--out eval.json]
    python eval.py --ckpt runs/cpu/contrastive --mbeir ROOT [--tasks all] [--pool local|union] \
        [--run_file run.trec]
    python eval.py --ckpt runs/cpu/contrastive --mmeb ROOT/mmeb/*.jsonl --mmeb_images ROOT  # MMEB

Every embedding here is *generated* (ELVA, Section 3.4): greedy summary, then [RET].
- Standard split: per task, queries on test scenes against a pool of one candidate per test scene. A
  hit at K means any relevant item (exact relevance, data.relevant) is in the top K; the rank of the
  best-scoring relevant item comes from kernels.corpus_ranks with the positives as index lists (no
  [queries, pool] matrix). Ties are pessimistic: a candidate scoring *equal* to the best positive
  ranks above it, so a collapsed model scores nothing. Chance R@5 depends on how many items are
  relevant (a short caption is satisfied by many scenes): the table prints it per task.
- MRBench-mini (the paper's Table 6 layout): queries with >= 2 grains, an equal number per task, in
  a pool made of every query's positive and its one-grain near misses. Recall@5 per task and the
  average.
- Near misses (grain blindness, the paper's Definition 2 in Section 3.2, in retrieval form):
  Recall@1 of the positive against only its own near misses, and the pairwise win rate s(q, pos) >
  s(q, near miss) per kind (attribute, binding, relation, no-edit).
- Grain-masking probe (the paper's grain-masking test): mean cosine distance between a query's
  embedding and the embedding of the same query with one grain removed, per grain type; larger = the
  grain moves the embedding.
- Summary swap: cosine distance between an input embedded with its own summary and with another
  input's summary: how much the [RET] state depends on the summary, i.e. how much RL on summaries
  can move.
- Non-finite embeddings (a broken model) rank last everywhere, and the table says how many there
  were.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import statistics
import textwrap
import time
from pathlib import Path

import torch

import data
import mbeir
from data import (INSTRUCTIONS, TASKS, BadInput, Caption, GrainWorld, Item, Mention, Query, Scene,
                  WorldConfig, relevant)
from kernels import corpus_ranks
from retriever import (Retriever, atomic_write, encode_rollout, instruction_of, ranked_top_k,
                       read_checkpoint)
from runtime import (Parser, check_device, default_threads, file_sha, log_records,
                     one_line_errors, resolve_device, write_json)

# --------------------------------------------------------------------------------------------------
# Metrics


def relevant_indices(task: str, queries: list[Query], pool: list[Item]) -> torch.Tensor:
    """[Q, P_max] int64: each query's relevant pool indices, -1 padding a shorter list -- the
    positives as index lists that kernels.corpus_ranks takes, so that evaluation never builds a
    [Q, pool] matrix."""
    lists = [[j for j, c in enumerate(pool) if relevant(task, q.item, c)] for q in queries]
    width = max(1, max((len(x) for x in lists), default=1))
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def ranks_of_best_positive(eq: torch.Tensor, ep: torch.Tensor,
                           positives: torch.Tensor) -> torch.Tensor:
    """eq (Q, D), ep (P, D), positives (Q, P_max) int64 relevant pool indices (-1 pads) -> rank
    (Q,) of each query's best-scoring relevant candidate among the non-relevant ones (pessimistic
    ties; NaN ranks last), streamed."""
    return corpus_ranks(eq, ep, positives.to(eq.device)).cpu()


def chance_recall(n_relevant: torch.Tensor, pool: int, k: int) -> float:
    """Expected Recall@K of a random ranking: 1 - C(P - r, K) / C(P, K), averaged over queries
    with r relevant."""
    hits = [1.0 - math.comb(pool - int(r), k) / math.comb(pool, k) for r in n_relevant.tolist()]
    return sum(hits) / len(n_relevant)


def n_nonfinite(*embeddings: torch.Tensor) -> int:
    return int(sum((~torch.isfinite(e).all(-1)).sum() for e in embeddings))


def recall_mrr(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    out = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    out["MRR"] = (1.0 / ranks.float()).mean().item()
    return out


# --------------------------------------------------------------------------------------------------
# Benchmarks


def embed_queries(ret: Retriever, task: str, queries, autocast, with_texts=False):
    e, texts = ret.embed_items([q.item for q in queries], [INSTRUCTIONS[task]] * len(queries),
                               autocast=autocast(), progress=f"eval {task} queries")
    return (e, texts) if with_texts else e


def embed_pool(ret: Retriever, pool, autocast):
    return ret.embed_items(pool, [None] * len(pool), autocast=autocast(), progress="eval pool")[0]


def standard_split(ret, world: GrainWorld, n_queries: int, autocast) -> dict:
    out = {}
    for task in TASKS:
        queries, pool = world.standard_split(task, n_queries)
        (eq, texts), ep = embed_queries(ret, task, queries, autocast, True), embed_pool(ret, pool,
                                                                                        autocast)
        pos = relevant_indices(task, queries, pool)                       # (Q, P_max), -1 pads
        n_rel = (pos >= 0).sum(1)
        # how often the generated (greedy) summary of a query is exactly its reference summary
        exact = sum(t == q.item.summary for t, q in zip(texts, queries)) / len(queries)
        out[task] = {**recall_mrr(ranks_of_best_positive(eq, ep, pos)), "pool": len(pool),
                     "relevant_per_query": n_rel.float().mean().item(), "summary_exact": exact,
                     "chance_R@5": chance_recall(n_rel, len(pool), 5), "nonfinite": n_nonfinite(eq,
                                                                                                ep)}
    out["avg"] = {k: sum(out[t][k] for t in TASKS) / len(TASKS)
                  for k in ("R@1", "R@5", "R@10", "MRR", "summary_exact", "chance_R@5")}
    out["nonfinite"] = sum(out[t]["nonfinite"] for t in TASKS)
    return out


def mrbench_and_near_misses(ret, world: GrainWorld, n_per_task: int, autocast):
    """-> (MRBench-mini R@5 per task, near-miss R@1 / pairwise win rates per task and kind, the
    benchmark itself)."""
    bench = world.mrbench_mini(n_per_task)
    mrb, near, sizes = {}, {}, {}
    for task, (queries, pool) in bench.items():
        eq, ep = embed_queries(ret, task, queries, autocast), embed_pool(ret, pool, autocast)
        pos = relevant_indices(task, queries, pool)
        ranks = ranks_of_best_positive(eq, ep, pos)
        mrb[task] = (ranks <= 5).float().mean().item()
        sizes[task] = {"queries": len(queries), "pool": len(pool),
                       "chance_R@5": chance_recall((pos >= 0).sum(1), len(pool), 5)}
        # near misses: pool = [pos_0, d_0..., pos_1, d_1..., ...] in query order
        wins, top1, off = {}, [], 0
        for i, q in enumerate(queries):
            s_pos = float(eq[i] @ ep[off])
            s_d = [float(eq[i] @ ep[off + 1 + j]) for j in range(len(q.distractors))]
            top1.append(all(s_pos > s for s in s_d))
            for (kind, _), s in zip(q.distractors, s_d):
                wins.setdefault(kind, []).append(s_pos > s)
            off += 1 + len(q.distractors)
        near[task] = {"R@1": sum(top1) / len(top1),
                      **{f"win_{k}": sum(v) / len(v) for k, v in sorted(wins.items())}}
        # the top 5 of a few queries, for the retrieval picture
        top = Retriever.search(eq[:4], ep, k=5)[1].cpu()
        near[task]["examples"] = [[(int(j), bool((pos[i] == j).any())) for j in top[i]]
                                  for i in range(top.shape[0])]
    mrb["avg"] = sum(mrb[t] for t in TASKS) / len(TASKS)
    kinds = sorted({k for t in TASKS for k in near[t] if k.startswith("win_")})
    near["examples"] = {t: near[t].pop("examples") for t in TASKS}
    near["avg"] = {"R@1": sum(near[t]["R@1"] for t in TASKS) / len(TASKS)}
    for k in kinds:
        vals = [near[t][k] for t in TASKS if k in near[t]]
        near["avg"][k] = sum(vals) / len(vals)
    return mrb, near, bench, sizes


def masked_captions(cap: Caption) -> list[tuple[str, Caption]]:
    """The caption with one grain removed, for each grain it states: (grain type, masked
    caption)."""
    out = []
    for i, m in enumerate(cap.mentions):
        for g in ("color", "size"):
            if getattr(m, g) is not None:
                ms = list(cap.mentions)
                ms[i] = Mention(**{**m.__dict__, g: None})
                out.append(("attribute", Caption(tuple(ms), cap.relation)))
    if cap.relation is not None:
        out.append(("relation", Caption(cap.mentions, None)))
    if len(cap.mentions) == 2:
        out.append(("entity", Caption(cap.mentions[:1])))
    return out


def grain_masking_probe(ret, bench, n: int, autocast) -> dict:
    """Mean cosine distance 1 - cos(f(q), f(q \\ {g})) over MRBench-mini queries (the paper: 100
    queries; 0.07 for the contrastive baseline, 0.15 for ELVA). Text queries (t2i) drop an
    attribute, the relation or an object; image queries (i2i) drop one object from the scene."""
    full, masked, kinds = [], [], []
    t2i = bench["t2i"][0][: n // 2]
    i2i = bench["i2i"][0][: n - len(t2i)]
    for q in t2i:
        for kind, cap in masked_captions(q.item.caption):
            full.append(q.item)
            masked.append(data.Item(text=cap.text(), summary=cap.summary(), caption=cap))
            kinds.append(kind)
    for q in i2i:
        objs = q.item.scene.objects
        for o in objs:
            if len(objs) > 1:
                full.append(q.item)
                rest = Scene.of([x for x in objs if x != o])
                masked.append(data.Item(scene=rest, summary=rest.summary(),
                                        render_seed=q.item.render_seed))
                kinds.append("entity (image)")
    instr = [INSTRUCTIONS["t2i"] if it.scene is None else INSTRUCTIONS["i2i"] for it in full]
    ef = ret.embed_items(full, instr, autocast=autocast())[0]
    em = ret.embed_items(masked, instr, autocast=autocast())[0]
    d = 1.0 - (ef * em).sum(-1)
    out = {"all": d.mean().item()}
    for k in sorted(set(kinds)):
        out[k] = d[torch.tensor([x == k for x in kinds])].mean().item()
    return out


def summary_swap(ret, world: GrainWorld, n: int, autocast) -> dict:
    """How far an embedding moves when its summary is swapped for another input's (same task, no
    instruction)."""
    rng = random.Random(7)
    scenes = rng.sample(world.splits["test"], min(n, len(world.splits["test"])))
    items = [data.Item(scene=s, summary=s.summary(), render_seed=i) for i, s in enumerate(scenes)]
    with autocast():
        own = ret.summarise(items, [None] * len(items))
        swapped = own[1:] + own[:1]
        b1, imgs = ret.batch(items, [None] * len(items), own)
        b2, _ = ret.batch(items, [None] * len(items), swapped)
        e1 = ret.model.embed(b1, imgs)
        e2 = ret.model.embed(b2, imgs)
    other = e1.roll(-1, 0)
    return {"swap_distance": (1 - (e1 * e2).sum(-1)).mean().item(),
            "between_inputs": (1 - (e1 * other).sum(-1)).mean().item()}


def embed_given(ret, items, instructions, summaries: list[str], autocast, chunk: int = 256):
    """Embeddings (N, D) of items with the given summaries teacher-forced (no generation)."""
    parts = []
    for i in range(0, len(items), chunk):
        summ = [ret.enc.summary(t) for t in summaries[i:i + chunk]]
        with torch.no_grad(), autocast():
            b, imgs = ret.batch(items[i:i + chunk], instructions[i:i + chunk], summ)
            parts.append(ret.model.embed(b, imgs).float())
    return torch.cat(parts)


def summary_headroom(ret, bench, autocast) -> dict:
    """MRBench-mini avg R@5 with every summary (queries and pool) replaced by its *reference*
    summary, and by an empty one ([RET] right after the prompt). Against the greedy-summary score
    this bounds what better words alone could buy -- all that GRPO's gradient can change -- and
    shows how much of the score the summary carries at all. Also "reads": with the reference
    summaries, each query's preference for its positive over each near miss, per kind (ties
    half)."""
    out, wins = {}, {}
    for mode in ("reference", "empty"):
        r5 = []
        for task, (queries, pool) in bench.items():
            instr = [INSTRUCTIONS[task]] * len(queries)
            items = [q.item for q in queries]
            words = [it.summary if mode == "reference" else "" for it in items]
            eq = embed_given(ret, items, instr, words, autocast)
            words = [it.summary if mode == "reference" else "" for it in pool]
            ep = embed_given(ret, pool, [None] * len(pool), words, autocast)
            pos = relevant_indices(task, queries, pool)
            r5.append((ranks_of_best_positive(eq, ep, pos) <= 5).float().mean().item())
            if mode == "reference":
                for kind, (s_pos, s_d) in near_miss_scores(eq, ep, queries).items():
                    wins.setdefault(kind, {})[task] = preference(s_pos, s_d)
        out[mode] = sum(r5) / len(r5)
    out["reads"] = {kind: sum(v.values()) / len(v) for kind, v in sorted(wins.items())}
    out["reads_per_task"] = wins
    return out


def near_miss_scores(eq: torch.Tensor, ep: torch.Tensor, queries) -> dict:
    """MRBench-mini's pool is [pos_0, near misses of 0..., pos_1, ...] in query order -> {kind:
    (s(q, positive), s(q, near miss))}, one pair per near miss."""
    out, off = {}, 0
    for i, q in enumerate(queries):
        for j, (kind, _) in enumerate(q.distractors):
            pair = out.setdefault(kind, ([], []))
            pair[0].append(float(eq[i] @ ep[off]))
            pair[1].append(float(eq[i] @ ep[off + 1 + j]))
        off += 1 + len(q.distractors)
    return out


# --------------------------------------------------------------------------------------------------
# The paper's precondition. ELVA's RL changes only the words of a summary (Section 3.4), so it
# starts from an MLLM that already sees its input and describes it, and whose [RET] state reads
# what the words say. Per grain, on held-out scenes:
#   sees   teacher-forced, the decoder finds an image's reference summary likelier than the same
#          summary with one grain edited (beside it, under another scene's image: the language
#          prior alone, about 0.5)
#   says   the greedy summary of an image states the grain as the reference does
#   reads  with exact reference summaries, [RET] puts a query nearer its positive than a one-grain
#          near miss (summary_headroom), and a caption nearer an entailed rewording than a
#          one-grain contradiction (stage 1's own test, on held-out scenes)
# Pairwise tests count a tie as half: a model blind to a grain scores 0.5, and where a reads row
# sits at 0.5 no policy over words can help.

SEES_KINDS = ("color", "size", "shape", "binding", "relation", "position")
SAYS_GRAINS = ("entity", "attribute", "binding", "relation", "cell", "exact")


def preference(a, b) -> float:
    """The share of pairs with a > b, a tie counted as half (NaN loses)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def summary_logprobs(ret, items, summaries: list[str], autocast, chunk: int = 256):
    """log p(summary, then [RET] | item's prompt), teacher-forced, for item i and summaries[i]
    (no instruction: the form of a pool's items) -> (N,) float64."""
    out = []
    for i in range(0, len(items), chunk):
        its = items[i:i + chunk]
        summ = [ret.enc.summary(t) for t in summaries[i:i + chunk]]
        with torch.no_grad(), autocast():
            b, imgs = ret.batch(its, [None] * len(its), summ)
            logp, _ = ret.model.token_logprobs(b, imgs)                          # (n, T)
        out.append(logp.double().sum(1))
    return torch.cat(out)


def sees(ret, scenes, autocast, seed: int = 0) -> dict:
    """Per edit kind: the share of images whose reference summary is likelier than its one-grain
    edit, under the image itself and under another scene's image ("prior")."""
    rng = random.Random(f"sees-{seed}")
    images = [Item(scene=s, render_seed=i) for i, s in enumerate(scenes)]
    rows, texts, kinds = [], [], []
    for i, s in enumerate(scenes):
        for kind in SEES_KINDS:
            t = data.scene_edit(rng, s, kind)
            if t is None or t.summary() == s.summary():
                continue
            for img in (i, (i + 1) % len(scenes)):            # its own image, then another scene's
                rows += [images[img], images[img]]
                texts += [s.summary(), t.summary()]
            kinds.append(kind)
    lp = summary_logprobs(ret, rows, texts, autocast).view(-1, 2, 2)  # (pairs, own/other, ref/edit)
    kinds = torch.tensor([SEES_KINDS.index(k) for k in kinds])
    out = {}
    for j, kind in enumerate(SEES_KINDS):
        m = kinds == j
        out[kind] = preference(lp[m, 0, 0], lp[m, 0, 1])
        out[f"{kind} (prior)"] = preference(lp[m, 1, 0], lp[m, 1, 1])
    return out


def read_summary(text: str) -> list[dict]:
    """A scene summary read back into its objects (the inverse of Scene.summary): one dict per
    ';'-separated part with the shape, colour, size, row and column it names (None where a part
    names none), so that a generated summary can be checked grain by grain."""
    out = []
    for part in text.split(";"):
        words = part.split()
        if not words:
            continue

        def first(vocab):
            return next((w for w in words if w in vocab), None)
        row, col = first(data.ROWS), first(data.COLS)
        out.append({"shape": first(data.SHAPES), "color": first(data.COLORS), "size": first(data.SIZES),
                    "row": None if row is None else data.ROWS.index(row),
                    "col": None if col is None else data.COLS.index(col)})
    return out


def summary_grains(scene: Scene, said: str) -> dict:
    """Which grains a generated image summary states as the scene's reference summary does:
    entity (the shapes), attribute (the colours and sizes), binding (which colour and size go with
    which shape), relation (every pair of objects in the same left/right and above/below order),
    cell (the share of objects named in their own cell), exact (the whole string)."""
    from collections import Counter
    got = read_summary(said)
    want = [o.__dict__ for o in scene.objects]

    def bag(objs, *keys):
        return Counter(tuple(o[k] for k in keys) for o in objs)
    where = {(o["color"], o["shape"]): (o["row"], o["col"]) for o in reversed(got)}
    cells = [where.get((o["color"], o["shape"])) for o in want]
    relation = all(c is not None and None not in c for c in cells)
    for a in range(len(want)):
        for b in range(a + 1, len(want)):
            if relation:
                for k, key in enumerate(("row", "col")):
                    d_want = want[a][key] - want[b][key]
                    d_got = cells[a][k] - cells[b][k]
                    relation &= (d_want > 0) - (d_want < 0) == (d_got > 0) - (d_got < 0)
    return {"entity": bag(got, "shape") == bag(want, "shape"),
            "attribute": bag(got, "color") + bag(got, "size") == bag(want, "color") + bag(want,
                                                                                        "size"),
            "binding": bag(got, "color", "shape") + bag(got, "size", "shape")
            == bag(want, "color", "shape") + bag(want, "size", "shape"),
            "relation": relation if len(want) > 1 else None,
            "cell": sum(c == (o["row"], o["col"]) for c, o in zip(cells, want)) / len(want),
            "exact": said == scene.summary()}


def says(ret, scenes, autocast) -> dict:
    """The share of images whose greedy summary (no instruction) states each grain right."""
    items = [Item(scene=s, render_seed=i) for i, s in enumerate(scenes)]
    _, texts = ret.embed_items(items, [None] * len(items), autocast=autocast())
    graded = [summary_grains(s, t) for s, t in zip(scenes, texts)]
    return {g: statistics.mean(float(x[g]) for x in graded if x[g] is not None)
            for g in SAYS_GRAINS}


def text_triplets(world: GrainWorld, n: int, seed: int = 3) -> dict:
    """Stage 1's test on held-out scenes: per contradiction kind, n (premise, entailed rewording,
    one-grain contradiction the scene does not satisfy) captions (data.nli_triplet's parts)."""
    rng = random.Random(f"{world.cfg.seed}-text-side-{seed}")
    out = {}
    for kind in ("attribute", "binding", "relation"):
        out[kind] = []
        for _ in range(200 * n):
            if len(out[kind]) == n:
                break
            s = rng.choice(world.splits["test"])
            p = data.random_caption(rng, s)
            h, e = data.entailed_caption(rng, p), data.caption_edit(rng, p, kind)
            if p.n_grains() >= 2 and h is not None and e is not None and not data.satisfies(s, e):
                out[kind].append((p, h, e))
    return out


def reads_text(embed, triplets: dict) -> dict:
    """Per kind: the share of premises whose embedding is nearer the entailed rewording than the
    contradiction (ties half). embed: captions -> unit embeddings (N, D)."""
    out = {}
    for kind, trip in triplets.items():
        if not trip:
            continue
        e = embed([c for t in trip for c in t]).view(len(trip), 3, -1)         # (n, p|h|e, D)
        out[kind] = preference((e[:, 0] * e[:, 1]).sum(-1), (e[:, 0] * e[:, 2]).sum(-1))
    return out


def precondition(ret, world: GrainWorld, n: int, headroom: dict, autocast) -> dict:
    """The sees / says / reads rows on n held-out scenes (and n text triplets per kind)."""
    scenes = random.Random(f"{world.cfg.seed}-precondition").sample(
        world.splits["test"], min(n, len(world.splits["test"])))

    def embed_captions(caps):   # [RET] after each caption's reference summary, as in stage 1
        items = [Item(text=c.text(), summary=c.summary(), caption=c) for c in caps]
        return embed_given(ret, items, [None] * len(items), [c.summary() for c in caps], autocast)
    return {"sees": sees(ret, scenes, autocast), "says": says(ret, scenes, autocast),
            "reads": headroom["reads"],
            "reads_text": reads_text(embed_captions, text_triplets(world, n))}


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    n = e.shape[0]
    s = e @ e.T
    return ((s.sum() - s.diagonal().sum()) / (n * (n - 1))).item()


def evaluate(ckpt: str, n_queries: int, n_mrbench: int, device, autocast, ret=None) -> dict:
    """Every GrainWorld measurement of a checkpoint (ret: a retriever to use in its place, e.g.
    study.py's words-from-one-model, embedding-by-another)."""
    ret = ret or Retriever.from_pretrained(ckpt, device)
    meta = ret.meta
    if not isinstance(meta.get("world"), dict):
        raise SystemExit(f"--ckpt {ckpt}: a checkpoint trained on M-BEIR; expected one trained "
                         "on GrainWorld (or give --mbeir)")
    world = GrainWorld(WorldConfig(**meta["world"]))
    t0 = time.time()
    std = standard_split(ret, world, n_queries, autocast)
    if std["nonfinite"]:
        print(f"warning: {ckpt} gives {std['nonfinite']} non-finite embeddings on the standard "
              "split; they rank last")
    mrb, near, bench, sizes = mrbench_and_near_misses(ret, world, n_mrbench, autocast)
    probe = grain_masking_probe(ret, bench, 100, autocast)
    swap = summary_swap(ret, world, 64, autocast)
    headroom = summary_headroom(ret, bench, autocast)
    pre = precondition(ret, world, n_queries, headroom, autocast)
    pool_emb = embed_pool(ret, bench["i2i"][1][:200], autocast)
    return {"ckpt": str(ckpt), "step": meta.get("step"), "standard": std, "mrbench": mrb,
            "mrbench_pools": sizes, "near_miss": near, "probe": probe, "swap": swap,
            "headroom": headroom, "precondition": pre,
            "mean_pairwise_cos": mean_pairwise_cosine(pool_emb), "eval_seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------
# Real data: M-BEIR in UniIR's layout (readers in mbeir.py) and MMEB's rows, streamed: neither the
# [queries, pool] score matrix nor a dense relevance matrix is ever built.


def ndcg_at_k(top: torch.Tensor, positives: list[list[int]], k: int = 10) -> float:
    """Mean NDCG@k with binary relevance: top (Q, >= k) pool indices best first; DCG = sum_i
    rel_i / log2(i + 1) over the top k, IDCG the same for min(#positives, k) relevant items at the
    top. `top` must come ranked by the reward's rule (ranked_top_k with the positives), so
    that a collapsed model earns nothing. A query with no positive in the pool scores 0."""
    total = 0.0
    for row, pos in zip(top.tolist(), positives):
        ps = set(pos)
        dcg = sum(1.0 / math.log2(i + 2) for i, j in enumerate(row[:k]) if j in ps)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(ps), k)))
        total += dcg / idcg if idcg else 0.0
    return total / max(1, len(positives))


def pool_key(ret, pool, instructions) -> dict:
    """What a pool's embeddings are made of: the model (its weights' hash), the pool file, every
    image's bytes (one hash over the pool's images in order) and the instructions they carry."""
    images = hashlib.sha256()
    for it in pool.items:
        if it.image_path:
            images.update(hashed(it.image_path).encode())
    weights = hashlib.sha256()
    for k, v in sorted(ret.model.state_dict().items()):
        weights.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return {"model_sha256": weights.hexdigest(), "device": str(ret.device),
            "dtype": "bf16" if ret.device.type == "cuda" else "fp32",
            "pool_sha256": hashed(pool.path), "images_sha256": images.hexdigest(),
            "instructions_sha256": text_sha(json.dumps(instructions))}


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hashed(path) -> str:
    """A file's sha256, computed once per evaluation (per path, size and modification time)."""
    st = os.stat(path)
    return _hashed(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _hashed(path: str, size: int, mtime: int) -> str:
    return file_sha(Path(path))


def pool_embeddings(ret, pool, cache_dir: Path | None, autocast, batch_size: int) -> torch.Tensor:
    """The pool's embeddings, from the cache when what they are made of (pool_key) is the same as
    when they were cached; the cache's place is printed, hit or written."""
    instructions = [None] * len(pool.items)                    # candidates carry no instruction
    key = pool_key(ret, pool, instructions)
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{pool.path.stem}-{key['model_sha256'][:12]}.safetensors"
    if path is not None and path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            if all(meta.get(k) == v for k, v in key.items()) and meta.get("dids_sha256") == \
                    text_sha(json.dumps(pool.dids)):
                print(f"  pool embeddings from the cache {path}")
                return f.get_tensor("embeddings").to(ret.device)
    e = ret.embed_items(pool.items, instructions, batch_size, autocast=autocast(),
                        progress=f"pool {pool.path.name}")[0]
    if path is not None:
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": e.cpu().contiguous()}
        meta = {**key, "dids_sha256": text_sha(json.dumps(pool.dids))}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
        print(f"  pool embeddings cached in {path}")
    return e


def mbeir_score(results: dict, tasks: list[str]) -> float:
    """The paper's M-BEIR number: the mean over tasks of R@5, R@10 for Fashion200K and FashionIQ
    (Table 1)."""
    fashion = ("fashion200k", "fashioniq")
    return sum(results[t]["R@10" if any(f in t.lower() for f in fashion) else "R@5"]
               for t in tasks) / len(tasks)


def read_mbeir_tasks(root, tasks, split, pool_kind, instruction, seed):
    """Every task's queries and pool, read and checked before any embedding."""
    root = Path(root)
    instructions = mbeir.read_mbeir_instructions(root / "instructions" / "query_instructions.tsv")
    known = mbeir.mbeir_tasks(root, split)
    tasks = known if tasks == ["all"] else tasks
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise BadInput(f"--tasks {','.join(tasks)}: unknown task(s) {unknown or tasks}; the "
                       f"M-BEIR folder {root} has query files for {known} (split {split})")
    loaded, pools = [], {}
    rng = random.Random(seed) if instruction == "random" else None
    for task in tasks:
        qpath, ppath = mbeir.mbeir_paths(root, task, split, pool_kind)
        if ppath not in pools:
            pools[ppath] = mbeir.read_mbeir_pool(ppath, root)
        qrels_path = root / "qrels" / split / f"mbeir_{task}_{split}_qrels.txt"
        qrels = mbeir.read_qrels(qrels_path) if qrels_path.is_file() else None
        qs = mbeir.read_mbeir_queries(qpath, pools[ppath], root, instructions, qrels=qrels,
                                      strict=False, instruction_rng=rng)
        loaded.append((task, qs, pools[ppath]))
        source = qrels_path.name if qrels is not None else "pos_cand_list"
        print(f"{task}: {len(qs.items)} queries against {ppath.name} ({len(pools[ppath].items)} "
              f"candidates); relevance from {source}; {qs.missed} queries with no relevant "
              f"candidate in the pool (misses)", flush=True)
    return tasks, loaded


def evaluate_mbeir(ret, root, tasks: list[str], split: str, pool_kind: str, autocast,
                   run_file: str | None = None, cache_dir: str | None = None,
                   run_depth: int = 100, batch_size: int = 256, instruction: str = "first",
                   seed: int = 0) -> dict:
    """Per task, UniIR's protocol: Recall@1/5/10 -- a hit if any relevant candidate (qrels, else
    pos_cand_list; no dataset filter) is in the top K, pessimistic ties -- plus MRR and NDCG@10
    ranked by the same rule, over the task's local pool (its `_<split>_cand_pool` where the
    release has one) or the union pool. A query none of whose relevant candidates is in the pool
    is a miss. Instructions: UniIR's prompts, the first or one drawn with `seed` (UniIR draws).
    Every input is read and checked before any embedding; the run file (TREC: qid Q0 did rank
    score run_id) is written whole or not at all."""
    tasks, loaded = read_mbeir_tasks(root, tasks, split, pool_kind, instruction, seed)
    out, run_lines = {}, []
    cache = Path(cache_dir) if cache_dir else None
    for task, qs, pool in loaded:
        t0 = time.time()
        ep = pool_embeddings(ret, pool, cache, autocast, batch_size)
        eq = ret.embed_items(qs.items, qs.instructions, batch_size, autocast=autocast(),
                             progress=f"{task} queries")[0]
        width = max(1, max(len(p) for p in qs.relevant))
        pos = torch.tensor([p + [-1] * (width - len(p)) for p in qs.relevant])   # (Q, P_max)
        has = pos[:, 0] >= 0                                   # the others are misses
        ranks = torch.full((len(qs.items),), len(pool.items) + 1, dtype=torch.long)
        if has.any():
            ranks[has] = ranks_of_best_positive(eq[has.to(eq.device)], ep, pos[has])
        # NDCG's ranked list and the run file's: the reward's rule (NaN last, a positive after
        # equal scores)
        scores, top = ranked_top_k(eq, ep, max(10, run_depth), positives=pos.to(eq.device))
        out[task] = {**recall_mrr(ranks), "NDCG@10": ndcg_at_k(top.cpu(), qs.relevant),
                     "queries": len(qs.items), "misses": qs.missed, "pool": len(pool.items),
                     "pool_file": pool.path.name, "nonfinite": n_nonfinite(eq, ep),
                     "seconds": time.time() - t0}
        for qid, row, srow in zip(qs.qids, top[:, :run_depth].tolist(),
                                  scores[:, :run_depth].tolist()):
            run_lines += [f"{qid} Q0 {pool.dids[j]} {r} {s:.6f} elva"
                          for r, (j, s) in enumerate(zip(row, srow), 1)]
    keys = ("R@1", "R@5", "R@10", "MRR", "NDCG@10")
    out["avg"] = {**{k: sum(out[t][k] for t in tasks) / len(tasks) for k in keys},
                  "M-BEIR score": mbeir_score(out, tasks)}
    if run_file:
        atomic_write(Path(run_file), lambda p: p.write_text("\n".join(run_lines) + "\n"))
    return out


def evaluate_mmeb(ret, paths: list[str], image_root: str, autocast, batch_size: int = 256):
    """MMEB (VLM2Vec) evaluation files: each row ranks its own target list, the first target the
    positive. Per file, keyed by the path as given: Precision@1 (VLM2Vec's metric: the positive
    ranks first; pessimistic ties, NaN last), MRR, and the chance level (mean of 1 / targets).
    Every file is read and checked before any embedding. To make these rows from the released
    parquet files, read them with any parquet reader outside this project and write one JSON
    object per row with the fields mbeir.read_mmeb names."""
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise BadInput(f"--mmeb: {twice} given twice; expected each file once")
    loaded = [(p, mbeir.read_mmeb(p, image_root)) for p in paths]
    out = {}
    for path, rows in loaded:
        t0 = time.time()
        eq = ret.embed_items([r[0] for r in rows], [r[1] for r in rows], batch_size,
                             autocast=autocast(), progress=f"{path} queries")[0]
        # each distinct target embedded once (VLM2Vec de-duplicates too: rows share targets)
        unique = {}
        for r in rows:
            for t in r[2]:
                unique.setdefault((t.text, t.image_path, r[3]), (t, r[3]))
        slot = {key: i for i, key in enumerate(unique)}
        et = ret.embed_items([t for t, _ in unique.values()], [i for _, i in unique.values()],
                             batch_size, autocast=autocast(), progress=f"{path} targets")[0]
        ranks = []
        for i, r in enumerate(rows):
            s = et[[slot[(t.text, t.image_path, r[3])] for t in r[2]]] @ eq[i]   # (targets,)
            ranks.append(len(r[2]) if torch.isnan(s[0]) else 1 + int((s[1:] >= s[0]).sum()))
        ranks = torch.tensor(ranks, dtype=torch.float64)
        out[path] = {"P@1": (ranks == 1).double().mean().item(), "MRR": (1 / ranks).mean().item(),
                     "chance_P@1": sum(1 / len(r[2]) for r in rows) / len(rows),
                     "queries": len(rows), "nonfinite": n_nonfinite(eq, et),
                     "seconds": time.time() - t0}
    out["avg"] = {k: sum(out[n][k] for n in out) / len(out) for k in ("P@1", "MRR", "chance_P@1")}
    return out


def mmeb_table(results: dict) -> str:
    lines = ["| dataset | queries | P@1 | MRR | chance P@1 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('queries', '')} | {r['P@1']:.3f} | {r['MRR']:.3f} | "
                     f"{r['chance_P@1']:.3f} |")
    return "\n".join(lines)


def mbeir_table(results: dict) -> str:
    keys = ("R@1", "R@5", "R@10", "MRR", "NDCG@10")
    lines = ["| task | queries | misses | pool | " + " | ".join(keys) + " |", "|---" * 9 + "|"]
    for task, r in results.items():
        sizes = f"{r['queries']} | {r['misses']} | {r['pool']}" if task != "avg" else " | | "
        lines.append(f"| {task} | {sizes} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    if "avg" in results:
        lines.append(f"\nM-BEIR score (the paper's: mean R@5, R@10 for Fashion200K and "
                     f"FashionIQ): {results['avg']['M-BEIR score']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Pictures, drawn with Pillow (no plotting library)

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (23, 190, 207)]


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def draw_curves(stage_dirs: list[str], out_png: str,
                keys=("infonce", "lm", "reward_mean", "R_margin", "R_rank",
                                                             "top1", "kl", "tied_groups")):
    """One panel per logged quantity, one line per stage folder (its log.jsonl), smoothed over 10
    steps."""
    from PIL import Image, ImageDraw
    logs = {}
    for d in stage_dirs:
        path = Path(d) / "log.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--curves: {path} not found; expected a stage folder written "
                                    "by train.py")
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        logs[f"{Path(d).parent.name}/{Path(d).name}"] = recs
    keys = [k for k in keys if any(k in r for recs in logs.values() for r in recs)]
    W, H, cols = 360, 240, 4
    rows = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (cols * W, rows * H + 24 + 16 * len(logs)), "white")
    draw = ImageDraw.Draw(img)
    for li, name in enumerate(logs):
        draw.line([(10, 12 + 16 * li), (30, 12 + 16 * li)], fill=PALETTE[li % len(PALETTE)],
                  width=3)
        draw.text((36, 6 + 16 * li), name, fill="black")
    top0 = 24 + 16 * len(logs)
    for ki, key in enumerate(keys):
        x0, y0 = (ki % cols) * W + 50, top0 + (ki // cols) * H + 20
        pw, ph = W - 70, H - 50
        series = {n: [(r["step"], r[key]) for r in recs if key in r] for n, recs in logs.items()}
        ys = [y for pts in series.values() for _, y in pts]
        if not ys:
            continue
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6
        # one step axis for every line
        xmax = max(x for pts in series.values() for x, _ in pts) or 1
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline="gray")
        draw.text((x0, y0 - 16), f"{key} (smoothed over 10 steps)", fill="black")
        # ticks: the value axis left, the step axis below, with their labels
        for f in (0.0, 0.5, 1.0):
            yv, xv = lo + f * (hi - lo), round(f * xmax)
            ty, tx = y0 + ph * (1 - f), x0 + pw * f
            draw.line([(x0 - 4, ty), (x0, ty)], fill="gray")
            draw.text((x0 - 48, ty - 6), f"{yv:.3g}", fill="gray")
            draw.line([(tx, y0 + ph), (tx, y0 + ph + 4)], fill="gray")
            draw.text((tx - 8, y0 + ph + 5), str(xv), fill="gray")
        draw.text((x0 + pw // 2 - 12, y0 + ph + 16), "step", fill="black")
        for li, (n, pts) in enumerate(series.items()):
            if len(pts) < 2:
                continue
            xs = [x for x, _ in pts]
            sm = _smooth([y for _, y in pts], 10)
            line = [(x0 + pw * x / xmax, y0 + ph * (1 - (y - lo) / (hi - lo)))
                    for x, y in zip(xs, sm)]
            draw.line(line, fill=PALETTE[li % len(PALETTE)], width=2)
    img.save(out_png)


def log_summary(stage_dir: str) -> str:
    """Means of the logged quantities over the first and the last fifth of a stage's steps, and
    its wall time."""
    recs = log_records(stage_dir)
    n = max(1, len(recs) // 5)
    keys = [k for k in recs[0]
            if isinstance(recs[0][k], (int, float)) and k not in ("step", "ms_per_step")]
    parts = []
    for k in keys:
        a = sum(r[k] for r in recs[:n]) / n
        b = sum(r[k] for r in recs[-n:]) / n
        parts.append(f"{k} {a:.4f} -> {b:.4f}")
    wall = recs[-1]["ms_per_step"] * len(recs) / 1000
    return (f"{stage_dir}: {len(recs)} steps, ~{wall / 60:.1f} min; first fifth -> last fifth: "
            + ", ".join(parts))


def draw_retrieval_grid(results: list[dict], bench, out_png: str, tasks=("t2i", "it2i"),
                        per_task=1):
    """For a few MRBench-mini queries: the query, then each checkpoint's top 5 (green frame:
    relevant)."""
    from PIL import Image, ImageDraw
    S, pad, qw = 64, 6, 230
    rows = [(t, i, r) for t in tasks for i in range(per_task) for r in results]
    img = Image.new("RGB", (qw + 5 * (S + pad) + 200, len(rows) * (S + pad) + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), "query", fill="black")
    draw.text((qw, 8), "top 5 (green: relevant, red: not)", fill="black")
    for ri, (task, i, res) in enumerate(rows):
        y = 28 + ri * (S + pad)
        q = bench[task][0][i]
        x = pad
        if q.item.scene is not None:
            img.paste(data.render(q.item.scene, S, q.item.render_seed), (x, y))
            x += S + pad
        text = q.item.text or "(image)"
        for li, line in enumerate(textwrap.wrap(text, 22 if q.item.scene is not None else 34)):
            draw.text((x, y + 4 + 12 * li), line, fill="black")
        for j, (idx, ok) in enumerate(res["near_miss"]["examples"][task][i]):
            c = bench[task][1][idx]
            cx = qw + j * (S + pad)
            img.paste(data.render(c.scene, S, c.render_seed), (cx, y))
            draw.rectangle([cx, y, cx + S - 1, y + S - 1],
                           outline=(0, 170, 0) if ok else (220, 0, 0), width=3)
        draw.text((qw + 5 * (S + pad) + 4, y + S // 2 - 6), Path(res["ckpt"]).name, fill="black")
    img.save(out_png)


# --------------------------------------------------------------------------------------------------
# Table


def table(results: list[dict]) -> str:
    names = [Path(r["ckpt"]).name for r in results]
    w = max(13, *(len(n) for n in names))
    rows = [("metric", names)]

    def add(label, get):
        vals = []
        for r in results:
            try:
                vals.append(f"{get(r):.3f}")
            except KeyError:
                vals.append("-")
        rows.append((label, vals))

    std0 = results[0]["standard"]
    for t in TASKS:
        chance = std0[t].get("chance_R@5")
        of_chance = f", chance R@5 {chance:.3f})" if chance else ")"
        add(f"standard {t} R@1 / R@5 (pool {std0[t]['pool']}" + of_chance,
            lambda r, t=t: r["standard"][t]["R@5"])
        both = [f"{r['standard'][t]['R@1']:.3f} / {r['standard'][t]['R@5']:.3f}" for r in results]
        rows[-1] = (rows[-1][0], both)
    add("standard avg R@1", lambda r: r["standard"]["avg"]["R@1"])
    add("standard avg R@5", lambda r: r["standard"]["avg"]["R@5"])
    add("standard avg MRR", lambda r: r["standard"]["avg"]["MRR"])
    add("query summaries exactly right", lambda r: r["standard"]["avg"]["summary_exact"])
    pools = results[0].get("mrbench_pools", {})
    for t in TASKS:
        size, label = pools.get(t), ""
        if size:   # results written before the pools were recorded have none
            label = (f" ({size['queries']} queries, pool {size['pool']}, "
                     f"chance {size['chance_R@5']:.3f})")
        add(f"MRBench-mini {t} R@5" + label, lambda r, t=t: r["mrbench"][t])
    add("MRBench-mini avg R@5", lambda r: r["mrbench"]["avg"])
    add("  ... with reference summaries", lambda r: r["headroom"]["reference"])
    add("  ... with empty summaries", lambda r: r["headroom"]["empty"])
    add("near-miss avg R@1", lambda r: r["near_miss"]["avg"]["R@1"])
    for k in sorted(k for k in results[0]["near_miss"]["avg"] if k.startswith("win_")):
        add(f"near-miss win rate vs {k[4:]}", lambda r, k=k: r["near_miss"]["avg"][k])
    pre = results[0].get("precondition")
    if pre:   # the paper's precondition (results written before it existed have none)
        def both(r, k):
            seen = r.get("precondition", {}).get("sees", {})
            return f"{seen[k]:.3f} / {seen[k + ' (prior)']:.3f}" if k in seen else "-"
        for k in SEES_KINDS:
            rows.append((f"sees {k}: reference summary likelier than its edit (own image / "
                         f"another's)", [both(r, k) for r in results]))
        for g in SAYS_GRAINS:
            add(f"says {g}: greedy image summaries right",
                lambda r, g=g: r["precondition"]["says"][g])
        for k in pre["reads"]:
            add(f"reads {k}: near-miss win, reference summaries on both sides",
                lambda r, k=k: r["precondition"]["reads"][k])
        for k in pre["reads_text"]:
            add(f"reads {k} (text): caption nearer its rewording than a contradiction",
                lambda r, k=k: r["precondition"]["reads_text"][k])
    for k in sorted(results[0]["probe"]):
        add(f"grain-masking distance ({k})", lambda r, k=k: r["probe"][k])
    add("summary-swap distance", lambda r: r["swap"]["swap_distance"])
    add("  distance between inputs", lambda r: r["swap"]["between_inputs"])
    add("mean pairwise cosine (i2i pool)", lambda r: r["mean_pairwise_cos"])
    rows.append(("non-finite embeddings (standard split)",
                 [str(r["standard"].get("nonfinite", "-")) for r in results]))
    lw = max(len(label) for label, _ in rows)
    lines = []
    for i, (label, vals) in enumerate(rows):
        lines.append(f"| {label:{lw}s} | " + " | ".join(f"{v:>{w}s}" for v in vals) + " |")
        if i == 0:
            lines.append("|" + "-" * (lw + 2) + "|" + "|".join("-" * (w + 2) for _ in vals) + "|")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# One RL step, shown: python eval.py --explain CKPT


def explain(ckpt: str, device, autocast, task: str | None = None, seed: int = 0):
    """One RL instance through the paper's stage-3 step (Section 3.4) with the functions training
    uses: its query and candidates (the positive and the mined negatives), the G rollouts'
    sampled summaries, each rollout's scores and ranked list, R_Margin, R_Rank, R_total and the
    group advantage. The checkpoint is the policy and also mines the negatives (in training the
    stage-2 model mines them); the run's own arguments (saved with it) give G, the temperature, the
    negative counts and the reward's constants."""
    import train
    from reward import auto_gamma, group_advantages, total_reward
    ret = Retriever.from_pretrained(ckpt, device)
    args = argparse.Namespace(**{**ret.meta["args"], "rl_queries": 1, "seed": seed})
    source = train.read_source(args, ret.meta)
    instances = train.mine_instances(args, source, ret, autocast)               # one query per task
    chosen = [x for x in instances if task is None or x[0].task == task]
    if not chosen:
        raise SystemExit(f"--explain_task {task!r}: expected one of "
                         f"{sorted({q.task for q, _ in instances})}")
    batch = chosen[:1]
    gen = torch.Generator(device=device).manual_seed(seed)
    made = encode_rollout(ret.enc, ret.prompt_limit, batch)
    with torch.no_grad():
        ro = train.rollout(args, ret.model, made, gen, autocast)
    R, parts = total_reward(ro.scores, args.alpha, args.epsilon, args.delta, args.gamma,
                            return_parts=True,
                            ranks=ro.ranks)                                    # (1, G)
    A = group_advantages(R)
    B, G, K = ro.shape
    q, negs = batch[0]
    names = ["positive"] + [f"negative {i + 1}" for i in range(len(negs))]
    C = K - 1
    gamma = auto_gamma(C) if args.gamma is None else args.gamma
    print(f"\nOne ELVA step on {ckpt} (Section 3.4), task {q.task}: G = {G} rollouts at "
          f"temperature {args.temperature}; R_total = {args.alpha} R_Margin + {args.epsilon} "
          f"R_Rank, delta {args.delta}, gamma {gamma:.4f}")
    print(f"query:      {describe(q.item)}   [instruction: {instruction_of(q)}]")
    for name, c in zip(names, [q.positive, *negs]):
        print(f"{name + ':':12s}{describe(c)}")
    for g in range(G):
        rows = [(g * K + k) for k in range(K)]                              # sequences of rollout g
        said = [ret.enc.decode(ro.summaries[r]) for r in rows]
        order = ro.ranks[0, g].tolist()
        ranked = sorted(range(C), key=lambda j: order[j])
        listing = "  ".join(f"[{order[j]}] {names[j]} {ro.scores[0, g, j].item():.3f}"
                            for j in ranked)
        print(f"\nrollout {g}: the query wrote {said[0]!r}")
        print(f"  ranked list: {listing}")
        print(f"  R_Margin {parts['margin'][0, g].item():.4f} | R_Rank "
              f"{parts['rank'][0, g].item():.4f} | "
              f"R_total {R[0, g].item():.4f} | advantage {A[0, g].item():+.3f}")
        wrote = " | ".join(f"{n}: {s!r}" for n, s in zip(names, said[1:]))
        print(f"  the candidates wrote: {wrote}")
    print(f"\ngroup: R_total mean {R.mean().item():.4f}, std {R.std().item():.4f}; every summary "
          "of rollout g shares its advantage A_g = (R_g - mean) / (std + 1e-4)")


def describe(item: Item) -> str:
    """An item in words: its text, and for an image its scene's reference summary (what the image
    shows)."""
    parts = [repr(item.text)] if item.text else []
    if item.scene is not None:
        parts.append(f"(image: {item.scene.summary()})")
    elif item.image_path:
        parts.append(f"(image {item.image_path})")
    return " ".join(parts) or "(empty)"


# --------------------------------------------------------------------------------------------------
# The command line: one small function per mode


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", action="append", default=[],
        help="checkpoint folder (repeat for a side-by-side table)")
    add("--queries", type=int, default=200, help="standard-split queries per task")
    add("--mrbench_per_task", type=int, default=100, help="MRBench-mini queries per task")
    add("--device", default="auto", help="auto | cpu | cuda | mps")
    add("--threads", type=int, default=None,
        help="CPU threads (default: the cores this process may use)")
    add("--out", default=None, help="write the results as JSON here")
    add("--grid", default=None, help="write a retrieval-grid PNG (top 5 of MRBench-mini queries) "
                                     "here")
    add("--curves", nargs="*", default=None,
        help="stage folders whose log.jsonl to plot (no --ckpt needed)")
    add("--curves_png", default="curves.png", help="where --curves writes its PNG")
    add("--explain", default=None, metavar="CKPT",
        help="walk one RL instance through the paper's stage-3 step and print it (explain)")
    add("--explain_task", default=None, help="the task of --explain's instance (default: the "
                                             "first task's)")
    add = p.add_argument_group("real data: M-BEIR in UniIR's layout (python mbeir.py "
                               "--sample DIR writes one)").add_argument
    add("--mbeir", default=None, help="the M-BEIR root (query/, cand_pool/, instructions/, images)")
    add("--tasks", default="all", help="comma list of task names, e.g. mscoco_task0,nights_task4; "
                                       "or all")
    add("--pool", default="local", choices=["local", "union"],
        help="each task's own pool or the union pool")
    add("--split", default="test", help="query split (query/<split>/)")
    add("--run_file", default=None,
        help="write a TREC run file (qid Q0 did rank score run_id) here")
    add("--run_depth", type=int, default=100, help="candidates per query in the run file")
    add("--cache", default=None, help="folder for cached pool embeddings (default: "
                                      "<ckpt>/mbeir_cache)")
    add("--instruction", default="first", choices=["first", "random"],
        help="UniIR's prompt per query: the "
        "first (deterministic) or one at random with --seed (UniIR draws one)")
    add("--seed", type=int, default=0, help="seed of --instruction random and of --explain's "
                                            "sampling")
    mmeb = "real data: MMEB (VLM2Vec) evaluation rows, one JSON object per line"
    add = p.add_argument_group(mmeb).add_argument
    add("--mmeb", nargs="+", default=None,
        help="MMEB jsonl file(s): qry_inst, qry_text, qry_img_path, "
        "tgt_inst, tgt_text[], tgt_img_path[] (first target the positive)")
    add("--mmeb_images", default=".", help="the folder MMEB's image paths are relative to")
    p.add_argument("--from_json", nargs="+", default=None,
                   help="re-print the tables of earlier --out JSON "
                   "files (no evaluation); several files are concatenated, e.g. runs/study/*.json")
    return p


def check_inputs(p, args):
    """Every path and number, before any work: one line naming the flag."""
    for flag in ("threads", "queries", "mrbench_per_task"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} {value}: expected an integer >= 1")
    check_device(args.device)
    for flag in ("out", "grid", "run_file", "curves_png"):   # where the results go, before the work
        path = getattr(args, flag)
        if path and not os.access(Path(path).resolve().parent, os.W_OK):
            p.error(f"--{flag} {path}: expected a file in a folder that exists and this process "
                    f"can write")
    for c in args.ckpt + ([args.explain] if args.explain else []):
        if not is_checkpoint(Path(c)):
            stages = sorted(d.name for d in Path(c).glob("*") if is_checkpoint(d))
            if stages:
                p.error(f"--ckpt {c}: a run folder, not a checkpoint; it holds the stage folders "
                        f"{stages}, e.g. --ckpt {Path(c) / stages[0]}")
            p.error(f"--ckpt {c}: no model.safetensors; expected a checkpoint folder written by "
                    f"train.py")
    if (args.mmeb or args.mbeir) and len(args.ckpt) != 1:
        p.error(f"--{'mmeb' if args.mmeb else 'mbeir'} evaluates one --ckpt at a time")
    if args.mbeir:
        if args.run_depth < 1:
            p.error(f"--run_depth {args.run_depth}: expected an integer >= 1")
        if not Path(args.mbeir).is_dir():
            p.error(f"--mbeir {args.mbeir}: not a folder; expected an M-BEIR root (query/, "
                    "cand_pool/, instructions/)")


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder (or one of the layout before model.safetensors held everything)."""
    return (folder / "model.safetensors").is_file() or (folder / "config.json").is_file()


def write_results(args, res):
    if args.out:
        write_json(Path(args.out), res)
        print(f"wrote {args.out}")


def mmeb_mode(args, device, autocast):
    ret = Retriever.from_pretrained(args.ckpt[0], device)
    try:
        res = evaluate_mmeb(ret, args.mmeb, args.mmeb_images, autocast)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--mmeb: {e} (image paths are read relative to --mmeb_images "
                         f"{args.mmeb_images})") \
            from None
    print(mmeb_table(res))
    write_results(args, res)


def mbeir_mode(args, device, autocast):
    ret = Retriever.from_pretrained(args.ckpt[0], device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cache = args.cache or str(Path(args.ckpt[0]) / "mbeir_cache")
    res = evaluate_mbeir(ret, args.mbeir, tasks, args.split, args.pool, autocast, args.run_file,
                         cache,
                         args.run_depth, instruction=args.instruction, seed=args.seed)
    print(mbeir_table(res))
    if args.run_file:
        print(f"wrote {args.run_file}")
    write_results(args, res)


def grainworld_mode(p, args, device, autocast):
    """The checkpoints side by side (and earlier results, --from_json): the table, the seeds'
    aggregate, the retrieval grid."""
    results = []
    for f in args.from_json or []:
        try:
            r = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--from_json {f}: cannot read it as the JSON that --out writes ({e})")
        results += r if isinstance(r, list) else [r]
    for c in args.ckpt:
        r = evaluate(c, args.queries, args.mrbench_per_task, device, autocast)
        print(f"evaluated {c} (step {r['step']}) in {r['eval_seconds']:.0f}s", flush=True)
        results.append(r)
    if not results:
        p.error("give at least one --ckpt (or --curves)")
    print(table(results))
    if args.grid:
        world_cfg = read_checkpoint(results[0]["ckpt"])[3]["world"]
        bench = GrainWorld(WorldConfig(**world_cfg)).mrbench_mini(args.mrbench_per_task)
        draw_retrieval_grid(results, bench, args.grid)
        print(f"wrote {args.grid}")
    write_results(args, results)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.curves:
        draw_curves(args.curves, args.curves_png)
        print(f"wrote {args.curves_png}")
        for d in args.curves:
            print(log_summary(d))
        if not args.ckpt:
            return
    check_inputs(p, args)
    torch.set_num_threads(args.threads or default_threads())
    device, autocast = resolve_device(args.device)
    if args.explain:
        explain(args.explain, device, autocast, args.explain_task, args.seed)
    elif args.mmeb:
        mmeb_mode(args, device, autocast)
    elif args.mbeir:
        mbeir_mode(args, device, autocast)
    else:
        grainworld_mode(p, args, device, autocast)


if __name__ == "__main__":
    one_line_errors(main)
