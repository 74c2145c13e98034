"""
Evaluation of GrainWorld checkpoints, side by side; real data (--mbeir, --mmeb) in mbeir.py.

    python eval.py --ckpt runs/cpu/contrastive --ckpt runs/cpu/elva [--out eval.json]
    python eval.py --from_json A.json B.json --compare elva control    # paired, with intervals
    python eval.py --ckpt CKPT --mbeir ROOT [--tasks all] [--run_file run.trec]   # UniIR's protocol

Every embedding is generated (ELVA, Section 3.4): greedy summary, then [RET]. The table: Recall@K
on the standard split (with chance), MRBench-mini R@5 (Table 6; also with reference and with
empty summaries), near-miss win rates, the paper's grain-masking distance, the precondition rows
(sees / says / reads per grain), the summary-swap distance. Ranks are pessimistic (a candidate
equal to the positive ranks above it) and streamed (kernels.corpus_ranks): a collapsed or broken
model scores nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import textwrap
import time
from pathlib import Path

import torch

import data
import mbeir
from data import (INSTRUCTIONS, TASKS, Caption, GrainWorld, Item, Mention, Query, Scene,
                  WorldConfig, grain_world, relevant)
from retriever import (Retriever, chance_recall, file_sha, n_nonfinite, ranks_of_best_positive,
                       read_checkpoint, recall_mrr, write_json)
from runtime import Parser, check_device, default_threads, number, one_line_errors, resolve_device

# ----------------------------------------------------------------------------------------
# Metrics


def relevant_indices(task: str, queries: list[Query], pool: list[Item]) -> torch.Tensor:
    """[Q, P_max] int64: each query's relevant pool indices, -1 padding a shorter list -- the
    positives as index lists that kernels.corpus_ranks takes, so that evaluation never builds a
    [Q, pool] matrix."""
    lists = [[j for j, c in enumerate(pool) if relevant(task, q.item, c)] for q in queries]
    width = max(1, max((len(x) for x in lists), default=1))
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


# ----------------------------------------------------------------------------------------
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
                     "queries": len(queries),
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
        mrb.setdefault("hits", {})[task] = (ranks <= 5).int().tolist()   # for paired comparisons
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


def summary_headroom(ret, bench, autocast) -> dict:
    """MRBench-mini avg R@5 with every summary replaced by its *reference* summary, and by an
    empty one: what better words alone could buy, and how much the summary carries. "reads":
    with reference summaries, each query's preference for its positive over each near miss."""
    out, wins = {}, {}
    for mode in ("reference", "empty"):
        r5 = []
        for task, (queries, pool) in bench.items():
            instr = [INSTRUCTIONS[task]] * len(queries)
            items = [q.item for q in queries]
            words = [it.summary if mode == "reference" else "" for it in items]
            eq = ret.embed_given(items, instr, words, autocast())[0]
            words = [it.summary if mode == "reference" else "" for it in pool]
            ep = ret.embed_given(pool, [None] * len(pool), words, autocast())[0]
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


# ----------------------------------------------------------------------------------------
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
    lp = ret.embed_given(rows, [None] * len(rows), texts, autocast())[1]
    lp = lp.view(-1, 2, 2)                                    # (pairs, own / other, ref / edit)
    kinds = torch.tensor([SEES_KINDS.index(k) for k in kinds])
    out = {}
    for j, kind in enumerate(SEES_KINDS):
        m = kinds == j
        out[kind] = preference(lp[m, 0, 0], lp[m, 0, 1])
        out[f"{kind} (prior)"] = preference(lp[m, 1, 0], lp[m, 1, 1])
    return out


def read_summary(text: str) -> list[dict]:
    """A scene summary read back into its objects (Scene.summary's inverse): per ';' part the
    shape, colour, size, row and column it names (None: not named)."""
    out = []
    for part in text.split(";"):
        words = part.split()
        if not words:
            continue

        def first(vocab):
            return next((w for w in words if w in vocab), None)
        row, col = first(data.ROWS), first(data.COLS)
        out.append({"shape": first(data.SHAPES), "color": first(data.COLORS),
                    "size": first(data.SIZES),
                    "row": None if row is None else data.ROWS.index(row),
                    "col": None if col is None else data.COLS.index(col)})
    return out


def summary_grains(scene: Scene, said: str) -> dict:
    """Which grains a generated image summary states as the reference does: entity (shapes),
    attribute (colours, sizes), binding (which go with which shape), relation (every pair in
    the same left/right and above/below order), cell (objects in their cell), exact."""
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
        return ret.embed_given(items, [None] * len(items), [c.summary() for c in caps],
                               autocast())[0]
    return {"sees": sees(ret, scenes, autocast), "says": says(ret, scenes, autocast),
            "reads": headroom["reads"],
            "reads_text": reads_text(embed_captions, text_triplets(world, n))}


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    n = e.shape[0]
    s = e @ e.T
    return ((s.sum() - s.diagonal().sum()) / (n * (n - 1))).item()


def evaluate(ckpt: str, n_queries: int, n_mrbench: int, device, autocast, ret=None) -> dict:
    """Every GrainWorld measurement of a checkpoint (ret: a retriever to use in its place, e.g.
    the study's words-from-one-model, embedding-by-another)."""
    ret = ret or Retriever.from_pretrained(ckpt, device)
    meta = ret.meta
    if not isinstance(meta.get("world"), dict):
        raise SystemExit(f"--ckpt {ckpt}: a checkpoint trained on M-BEIR; expected one trained "
                         "on GrainWorld (or give --mbeir)")
    world = grain_world(WorldConfig(**meta["world"]))
    t0 = time.time()
    print(f"eval {ckpt}: the standard split ({n_queries} queries a task), MRBench-mini "
          f"({n_mrbench} a task), the probes, the precondition", flush=True)
    std = standard_split(ret, world, n_queries, autocast)
    if std["nonfinite"]:
        print(f"warning: {ckpt} gives {std['nonfinite']} non-finite embeddings on the standard "
              "split; they rank last")
    print(f"eval {ckpt}: MRBench-mini ({time.time() - t0:.0f}s)", flush=True)
    mrb, near, bench, sizes = mrbench_and_near_misses(ret, world, n_mrbench, autocast)
    probe = grain_masking_probe(ret, bench, 100, autocast)
    swap = summary_swap(ret, world, 64, autocast)
    print(f"eval {ckpt}: the probes and the precondition ({time.time() - t0:.0f}s)", flush=True)
    headroom = summary_headroom(ret, bench, autocast)
    pre = precondition(ret, world, n_queries, headroom, autocast)
    pool_emb = embed_pool(ret, bench["i2i"][1][:200], autocast)
    path = Path(ckpt) / "model.safetensors"
    return {"ckpt": str(ckpt), "step": meta.get("step"), "world": meta["world"],
            "weights_sha256": file_sha(path) if path.is_file() else None,
            "init_sha256": meta.get("init_sha256"), "standard": std, "mrbench": mrb,
            "mrbench_pools": sizes, "near_miss": near, "probe": probe, "swap": swap,
            "headroom": headroom, "precondition": pre,
            "mean_pairwise_cos": mean_pairwise_cosine(pool_emb), "eval_seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------
# Pictures, drawn with Pillow (no plotting library)

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


# ----------------------------------------------------------------------------------------
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
    rows.append((f"(a checkpoint's numbers depend on the sizes: {std0['t2i'].get('queries', '?')} "
                 f"standard-split queries a task)", [""] * len(results)))
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


# ----------------------------------------------------------------------------------------
# Paired comparisons: two checkpoints that started from one stage-2 model (ELVA and its
# equal-compute control, say), on the same MRBench-mini queries. The difference of their R@5, with
# a 95% interval from a bootstrap over the queries -- paired: one resample serves both -- per
# stage-2 model and over all of them.


def check_pooled(results: list[dict]):
    """Results pooled as seeds must be different models on one benchmark: refuse a checkpoint
    counted twice (the same weights) and evaluations of different sizes (another world's seed
    is welcome)."""
    seen = {}
    for r in results:
        w = r.get("weights_sha256")
        if w and w in seen:
            raise SystemExit(f"{r['ckpt']} and {seen[w]} hold the same weights: one model counted "
                             f"twice; expected each checkpoint once")
        seen[w] = r["ckpt"]
    sizes = {json.dumps([{k: v for k, v in (r.get("world") or {}).items() if k != "seed"},
                         {t: p["queries"] for t, p in r.get("mrbench_pools", {}).items()}])
             for r in results}
    if len(sizes) > 1:
        raise SystemExit("the results come from evaluations of different sizes (world sizes, "
                         "MRBench-mini queries); expected one benchmark (re-evaluate with the same "
                         "--mrbench_per_task)")


def paired_interval(diffs: list[torch.Tensor], n: int = 2000, seed: int = 0):
    """diffs: per pair, the per-query differences -> (the mean over pairs of their means, its 95%
    interval from resampling each pair's queries)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(n, dtype=torch.float64)
    for d in diffs:
        means += d[torch.randint(len(d), (n, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(means / len(diffs), torch.tensor([0.025, 0.975],
                                                             dtype=torch.float64)).tolist()
    return sum(d.mean().item() for d in diffs) / len(diffs), lo, hi


def compare(results: list[dict], a: str, b: str) -> str:
    """Pair each result named like `a` with the one named like `b` that has the same stage-2 model
    (init_sha256) -> a table: both R@5s, the difference and its 95% interval, per pair and over
    all pairs (with the sd of the pairs' differences)."""
    check_pooled(results)
    name = {id(r): Path(r["ckpt"]).name for r in results}
    pairs = []
    for ra in (r for r in results if re.search(a, name[id(r)])):
        mates = [r for r in results if re.search(b, name[id(r)]) and r is not ra
                 and r.get("init_sha256") == ra.get("init_sha256")]
        if len(mates) != 1:
            raise SystemExit(f"--compare: {ra['ckpt']} has {len(mates)} results named like "
                             f"{b!r} from its stage-2 model; expected exactly one")
        pairs.append((ra, mates[0]))
    if not pairs:
        raise SystemExit(f"--compare: no result named like {a!r}")

    def hits(r):
        hits = [h for t in TASKS for h in r["mrbench"]["hits"][t]]     # (queries,) 0/1
        return torch.tensor(hits, dtype=torch.float64)
    diffs = [hits(x) - hits(y) for x, y in pairs]
    lines = [f"| pair (same stage-2 model) | {a} R@5 | {b} R@5 | difference | 95% interval |",
             "|---|---|---|---|---|"]
    for (x, y), d in zip(pairs, diffs):
        m, lo, hi = paired_interval([d])
        lines.append(f"| {x['ckpt']} vs {y['ckpt']} | {x['mrbench']['avg']:.3f} | "
                     f"{y['mrbench']['avg']:.3f} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    m, lo, hi = paired_interval(diffs)
    sd = statistics.stdev([d.mean().item() for d in diffs]) if len(diffs) > 1 else 0.0
    mean_a = statistics.mean(x["mrbench"]["avg"] for x, _ in pairs)
    mean_b = statistics.mean(y["mrbench"]["avg"] for _, y in pairs)
    lines.append(f"| all {len(pairs)} (sd of the differences {sd:.3f}) | {mean_a:.3f} | "
                 f"{mean_b:.3f} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The command line: one small function per mode


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = number(1, kind=int)
    add = p.add_argument
    add("--ckpt", action="append", default=[], help="checkpoint folder (repeat: side by side)")
    add("--queries", type=count, default=200, help="standard-split queries per task")
    add("--mrbench_per_task", type=count, default=100, help="MRBench-mini queries per task")
    add("--device", default="auto", help="auto | cpu | cuda | mps")
    add("--threads", type=count, default=None, help="CPU threads (default: the cores this "
                                                    "process may use)")
    add("--out", default=None, help="write the results as JSON here")
    add("--from_json", nargs="+", default=None, help="earlier --out files (no evaluation)")
    add("--compare", nargs=2, default=None, metavar=("A", "B"), help="pair the results named "
        "like A and B (regexes) that started from one stage-2 model: R@5 differences with 95%% "
        "intervals")
    add("--grid", default=None, help="write a retrieval-grid PNG (MRBench-mini's top 5) here")
    add("--seed", type=int, default=0, help="seed of --instruction random")
    add = p.add_argument_group("real data: M-BEIR in UniIR's layout, MMEB's rows (mbeir.py)"
                               ).add_argument
    add("--mbeir", default=None, help="the M-BEIR root (query/, cand_pool/, instructions/)")
    add("--tasks", default="all", help="comma list of tasks, e.g. mscoco_task0; or all")
    add("--pool", default="local", choices=["local", "union"], help="each task's pool or union")
    add("--split", default="test", help="query split (query/<split>/)")
    add("--run_file", default=None, help="write a TREC run file (qid Q0 did rank score run_id)")
    add("--run_depth", type=count, default=100, help="candidates per query in the run file")
    add("--cache", default=None, help="pool embeddings' cache (default <ckpt>/mbeir_cache)")
    add("--instruction", default="first", choices=["first", "random"], help="UniIR's first "
        "prompt per query, or one drawn with --seed (as UniIR does)")
    add("--mmeb", nargs="+", default=None, help="MMEB jsonl file(s): qry_inst, qry_text, "
        "qry_img_path, tgt_inst, tgt_text[], tgt_img_path[] (the first target the positive)")
    add("--mmeb_images", default=".", help="the folder MMEB's image paths are relative to")
    return p


OUTPUTS = {"out": ".json", "grid": ".png", "run_file": None}


def check_inputs(p, args):
    """Every path before any work, one line naming the flag. An output goes to a folder that
    exists, never into a checkpoint folder, and replaces no file but an earlier output of its
    own kind."""
    check_device(args.device)
    for flag, kind in OUTPUTS.items():
        path = getattr(args, flag) and Path(getattr(args, flag))
        if not path:
            continue
        if not os.access(path.resolve().parent, os.W_OK):
            p.error(f"--{flag} {path}: expected a file in a folder that exists and this process "
                    f"can write")
        if is_checkpoint(path.resolve().parent):
            p.error(f"--{flag} {path}: expected a path outside a checkpoint folder")
        if path.exists() and not own_output(path, kind):
            p.error(f"--{flag} {path}: expected a new file or an earlier --{flag} output (it "
                    f"holds something else)")
    for c in args.ckpt:
        if not is_checkpoint(Path(c)):
            stages = sorted(d.name for d in Path(c).glob("*") if is_checkpoint(d))
            if stages:
                p.error(f"--ckpt {c}: a run folder, not a checkpoint; it holds the stage folders "
                        f"{stages}, e.g. --ckpt {Path(c) / stages[0]}")
            what = "no model.safetensors" if Path(c).is_dir() else "no such folder"
            p.error(f"--ckpt {c}: {what}; expected a checkpoint folder written by train.py")
    shas = [file_sha(f) for c in args.ckpt if (f := Path(c) / "model.safetensors").is_file()]
    if len(set(shas)) < len(shas):              # one model twice, before it is evaluated twice
        p.error(f"--ckpt: the same weights twice in {args.ckpt}; expected each model once")
    if (args.mmeb or args.mbeir) and len(args.ckpt) != 1:
        p.error(f"--{'mmeb' if args.mmeb else 'mbeir'} evaluates one --ckpt at a time")
    if args.mbeir and not Path(args.mbeir).is_dir():
        p.error(f"--mbeir {args.mbeir}: not a folder; expected an M-BEIR root (query/, "
                "cand_pool/, instructions/)")


def own_output(path: Path, kind: str | None) -> bool:
    """An earlier output of this kind: JSON, a PNG, or a TREC run (six fields a line)."""
    head = path.read_bytes()[:4096]
    if kind == ".png":
        return head.startswith(b"\x89PNG")
    if kind == ".json":
        try:
            json.loads(path.read_text())
            return True
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    line = head.split(b"\n", 1)[0].split()
    return len(line) == 6 and line[1] == b"Q0"


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder (or one of the older layout: a config.json)."""
    return (folder / "model.safetensors").is_file() or (folder / "config.json").is_file()


def write_results(args, res):
    if args.out:
        write_json(Path(args.out), res)
        print(f"wrote {args.out}")


def mmeb_mode(args, device, autocast):
    ret = Retriever.from_pretrained(args.ckpt[0], device)
    try:
        res = mbeir.evaluate_mmeb(ret, args.mmeb, args.mmeb_images, autocast)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--mmeb: {e} (image paths are read relative to --mmeb_images "
                         f"{args.mmeb_images})") \
            from None
    print(mbeir.mmeb_table(res))
    write_results(args, res)


def mbeir_mode(args, device, autocast):
    ret = Retriever.from_pretrained(args.ckpt[0], device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cache = args.cache or str(Path(args.ckpt[0]) / "mbeir_cache")
    res = mbeir.evaluate_mbeir(ret, args.mbeir, tasks, args.split, args.pool, autocast,
                               args.run_file, cache, args.run_depth, instruction=args.instruction,
                               seed=args.seed, run_id=Path(args.ckpt[0]).resolve().name)
    print(mbeir.mbeir_table(res))
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
        p.error("give at least one --ckpt (or --from_json)")
    check_pooled(results) if len(results) > 1 else None
    print(table(results))
    if args.compare:
        print(compare(results, *args.compare))
    if args.grid:
        world_cfg = read_checkpoint(results[0]["ckpt"])[3]["world"]
        bench = grain_world(WorldConfig(**world_cfg)).mrbench_mini(args.mrbench_per_task)
        draw_retrieval_grid(results, bench, args.grid)
        print(f"wrote {args.grid}")
    write_results(args, results)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_inputs(p, args)
    torch.set_num_threads(args.threads or default_threads())
    device, autocast = resolve_device(args.device)
    if args.mmeb:
        mmeb_mode(args, device, autocast)
    elif args.mbeir:
        mbeir_mode(args, device, autocast)
    else:
        grainworld_mode(p, args, device, autocast)


if __name__ == "__main__":
    one_line_errors(main)
