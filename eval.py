"""
Evaluation: Recall@K / MRR on the four tasks, MRBench-mini, near-miss grain blindness, the grain-masking probe and
the summary-swap diagnostic, for one or several checkpoints side by side.

    python eval.py --ckpt runs/cpu/contrastive --ckpt runs/cpu/elva [--out eval.json]
    python eval.py --ckpt runs/cpu/contrastive --mbeir ROOT [--tasks all] [--pool local|union] [--run_file run.trec]
    python eval.py --ckpt runs/cpu/contrastive --mmeb ROOT/mmeb/*.jsonl --mmeb_images ROOT   # MMEB rows

Every embedding here is *generated* (ELVA, Section 3.4): greedy summary, then [RET].
- Standard split: per task, queries on test scenes against a pool of one candidate per test scene. A hit at K means
  any relevant item (exact relevance, data.relevant) is in the top K; the rank of the best-scoring relevant item comes
  from kernels.corpus_ranks with the positives as index lists (no [queries, pool] matrix). Ties are pessimistic: a
  candidate scoring *equal* to the best positive ranks above it, so a collapsed model scores nothing. Chance R@5
  depends on how many items are relevant (a short caption is satisfied by many scenes): the table prints it per task.
- MRBench-mini (the paper's Table 6 layout): queries with >= 2 grains, an equal number per task, in a pool made of
  every query's positive and its one-grain near misses. Recall@5 per task and the average.
- Near misses (grain blindness, the paper's Definition 2 in Section 3.2, in retrieval form): Recall@1 of the positive
  against only its own near misses, and the pairwise win rate s(q, pos) > s(q, near miss) per kind (attribute,
  binding, relation, no-edit).
- Grain-masking probe (the paper's grain-masking test): mean cosine distance between a query's embedding and the
  embedding of the same query with one grain removed, per grain type; larger = the grain moves the embedding.
- Summary swap: cosine distance between an input embedded with its own summary and with another input's summary:
  how much the [RET] state depends on the summary, i.e. how much RL on summaries can move.
- Non-finite embeddings (a broken model) rank last everywhere, and the table says how many there were.
"""

from __future__ import annotations

import argparse
import json
import random
import textwrap
import time
from pathlib import Path

import torch

import data
import elva
from data import INSTRUCTIONS, TASKS, Caption, GrainWorld, Item, Mention, Query, Scene, WorldConfig, relevant
from kernels import corpus_ranks

# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def relevant_indices(task: str, queries: list[Query], pool: list[Item]) -> torch.Tensor:
    """[Q, P_max] int64: each query's relevant pool indices, -1 padding a shorter list -- the positives as index
    lists that kernels.corpus_ranks takes, so that evaluation never builds a [Q, pool] matrix."""
    lists = [[j for j, c in enumerate(pool) if relevant(task, q.item, c)] for q in queries]
    width = max(1, max((len(x) for x in lists), default=1))
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def ranks_of_best_positive(eq: torch.Tensor, ep: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """eq (Q, D), ep (P, D), positives (Q, P_max) int64 relevant pool indices (-1 pads) -> rank (Q,) of each query's
    best-scoring relevant candidate among the non-relevant ones (pessimistic ties; NaN ranks last), streamed."""
    return corpus_ranks(eq, ep, positives.to(eq.device)).cpu()


def chance_recall(n_relevant: torch.Tensor, pool: int, k: int) -> float:
    """Expected Recall@K of a random ranking: 1 - C(P - r, K) / C(P, K), averaged over queries with r relevant."""
    import math
    return sum(1.0 - math.comb(pool - int(r), k) / math.comb(pool, k) for r in n_relevant.tolist()) / len(n_relevant)


def n_nonfinite(*embeddings: torch.Tensor) -> int:
    return int(sum((~torch.isfinite(e).all(-1)).sum() for e in embeddings))


def recall_mrr(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    out = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    out["MRR"] = (1.0 / ranks.float()).mean().item()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Benchmarks


def embed_queries(ret: elva.Retriever, task: str, queries, autocast, with_texts=False):
    e, texts = ret.embed_items([q.item for q in queries], [INSTRUCTIONS[task]] * len(queries), autocast=autocast(),
                               progress=f"eval {task} queries")
    return (e, texts) if with_texts else e


def embed_pool(ret: elva.Retriever, pool, autocast):
    return ret.embed_items(pool, [None] * len(pool), autocast=autocast(), progress="eval pool")[0]


def standard_split(ret, world: GrainWorld, n_queries: int, autocast) -> dict:
    out = {}
    for task in TASKS:
        queries, pool = world.standard_split(task, n_queries)
        (eq, texts), ep = embed_queries(ret, task, queries, autocast, True), embed_pool(ret, pool, autocast)
        pos = relevant_indices(task, queries, pool)                       # (Q, P_max), -1 pads
        n_rel = (pos >= 0).sum(1)
        # how often the generated (greedy) summary of a query is exactly its reference summary
        exact = sum(t == q.item.summary for t, q in zip(texts, queries)) / len(queries)
        out[task] = {**recall_mrr(ranks_of_best_positive(eq, ep, pos)), "pool": len(pool),
                     "relevant_per_query": n_rel.float().mean().item(), "summary_exact": exact,
                     "chance_R@5": chance_recall(n_rel, len(pool), 5), "nonfinite": n_nonfinite(eq, ep)}
    out["avg"] = {k: sum(out[t][k] for t in TASKS) / len(TASKS)
                  for k in ("R@1", "R@5", "R@10", "MRR", "summary_exact", "chance_R@5")}
    out["nonfinite"] = sum(out[t]["nonfinite"] for t in TASKS)
    return out


def mrbench_and_near_misses(ret, world: GrainWorld, n_per_task: int, autocast):
    """-> (MRBench-mini R@5 per task, near-miss R@1 / pairwise win rates per task and kind, the benchmark itself)."""
    bench = world.mrbench_mini(n_per_task)
    mrb, near = {}, {}
    for task, (queries, pool) in bench.items():
        eq, ep = embed_queries(ret, task, queries, autocast), embed_pool(ret, pool, autocast)
        pos = relevant_indices(task, queries, pool)
        ranks = ranks_of_best_positive(eq, ep, pos)
        mrb[task] = (ranks <= 5).float().mean().item()
        # near misses: pool = [pos_0, d_0..., pos_1, d_1..., ...] in query order
        wins, top1, off = {}, [], 0
        for i, q in enumerate(queries):
            s_pos = float(eq[i] @ ep[off])
            s_d = [float(eq[i] @ ep[off + 1 + j]) for j in range(len(q.distractors))]
            top1.append(all(s_pos > s for s in s_d))
            for (kind, _), s in zip(q.distractors, s_d):
                wins.setdefault(kind, []).append(s_pos > s)
            off += 1 + len(q.distractors)
        near[task] = {"R@1": sum(top1) / len(top1), **{f"win_{k}": sum(v) / len(v) for k, v in sorted(wins.items())}}
        # the top 5 of a few queries, for the retrieval picture
        top = elva.Retriever.search(eq[:4], ep, k=5)[1].cpu()
        near[task]["examples"] = [[(int(j), bool((pos[i] == j).any())) for j in top[i]] for i in range(top.shape[0])]
    mrb["avg"] = sum(mrb[t] for t in TASKS) / len(TASKS)
    kinds = sorted({k for t in TASKS for k in near[t] if k.startswith("win_")})
    near["examples"] = {t: near[t].pop("examples") for t in TASKS}
    near["avg"] = {"R@1": sum(near[t]["R@1"] for t in TASKS) / len(TASKS)}
    for k in kinds:
        vals = [near[t][k] for t in TASKS if k in near[t]]
        near["avg"][k] = sum(vals) / len(vals)
    return mrb, near, bench


def masked_captions(cap: Caption) -> list[tuple[str, Caption]]:
    """The caption with one grain removed, for each grain it states: (grain type, masked caption)."""
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
    """Mean cosine distance 1 - cos(f(q), f(q \\ {g})) over MRBench-mini queries (the paper: 100 queries; 0.07 for
    the contrastive baseline, 0.15 for ELVA). Text queries (t2i) drop an attribute, the relation or an object; image
    queries (i2i) drop one object from the scene."""
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
                masked.append(data.Item(scene=rest, summary=rest.summary(), render_seed=q.item.render_seed))
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
    """How far an embedding moves when its summary is swapped for another input's (same task, no instruction)."""
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
    """MRBench-mini avg R@5 with every summary (queries and pool) replaced by its *reference* summary, and by an
    empty one ([RET] right after the prompt). Against the greedy-summary score this bounds what better words alone
    could buy -- all that GRPO's gradient can change -- and shows how much of the score the summary carries at all."""
    out = {}
    for mode in ("reference", "empty"):
        r5 = []
        for task, (queries, pool) in bench.items():
            e = []
            for items, instr in (([q.item for q in queries], [INSTRUCTIONS[task]] * len(queries)),
                                 (pool, [None] * len(pool))):
                parts = []
                for i in range(0, len(items), 256):
                    its, ins = items[i:i + 256], instr[i:i + 256]
                    summ = [ret.enc.summary(it.summary) if mode == "reference" else [] for it in its]
                    with torch.no_grad(), autocast():
                        b, imgs = ret.batch(its, ins, summ)
                        parts.append(ret.model.embed(b, imgs).float())
                e.append(torch.cat(parts))
            pos = relevant_indices(task, queries, pool)
            r5.append((ranks_of_best_positive(e[0], e[1], pos) <= 5).float().mean().item())
        out[mode] = sum(r5) / len(r5)
    return out


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    n = e.shape[0]
    s = e @ e.T
    return ((s.sum() - s.diagonal().sum()) / (n * (n - 1))).item()


def evaluate(ckpt: str, n_queries: int, n_mrbench: int, device, autocast) -> dict:
    ret = elva.Retriever.from_pretrained(ckpt, device)
    meta = ret.meta
    if not isinstance(meta.get("world"), dict):
        raise SystemExit(f"--ckpt {ckpt}: config.json has no 'world' section; expected a checkpoint written by "
                         f"train.py on GrainWorld")
    world = GrainWorld(WorldConfig(**meta["world"]))
    t0 = time.time()
    std = standard_split(ret, world, n_queries, autocast)
    if std["nonfinite"]:
        print(f"warning: {ckpt} gives {std['nonfinite']} non-finite embeddings on the standard split; they rank last")
    mrb, near, bench = mrbench_and_near_misses(ret, world, n_mrbench, autocast)
    probe = grain_masking_probe(ret, bench, 100, autocast)
    swap = summary_swap(ret, world, 64, autocast)
    headroom = summary_headroom(ret, bench, autocast)
    pool_emb = embed_pool(ret, bench["i2i"][1][:200], autocast)
    return {"ckpt": str(ckpt), "step": meta.get("step"), "standard": std, "mrbench": mrb, "near_miss": near,
            "probe": probe, "swap": swap, "headroom": headroom, "mean_pairwise_cos": mean_pairwise_cosine(pool_emb),
            "eval_seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------------------------------
# Pictures, drawn with Pillow (no plotting library)

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def draw_curves(stage_dirs: list[str], out_png: str, keys=("infonce", "lm", "reward_mean", "R_margin", "R_rank",
                                                             "top1", "kl", "tied_groups")):
    """One panel per logged quantity, one line per stage folder (its log.jsonl), smoothed over 10 steps."""
    from PIL import Image, ImageDraw
    logs = {}
    for d in stage_dirs:
        path = Path(d) / "log.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--curves: {path} not found; expected a stage folder written by train.py")
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        logs[f"{Path(d).parent.name}/{Path(d).name}"] = recs
    keys = [k for k in keys if any(k in r for recs in logs.values() for r in recs)]
    W, H, cols = 360, 240, 4
    rows = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (cols * W, rows * H + 24 + 16 * len(logs)), "white")
    draw = ImageDraw.Draw(img)
    for li, name in enumerate(logs):
        draw.line([(10, 12 + 16 * li), (30, 12 + 16 * li)], fill=PALETTE[li % len(PALETTE)], width=3)
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
        xmax = max(x for pts in series.values() for x, _ in pts) or 1         # one step axis for every line
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline="gray")
        draw.text((x0, y0 - 16), f"{key} (smoothed over 10 steps)", fill="black")
        for f in (0.0, 0.5, 1.0):   # ticks: the value axis left, the step axis below, with their labels
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
            line = [(x0 + pw * x / xmax, y0 + ph * (1 - (y - lo) / (hi - lo))) for x, y in zip(xs, sm)]
            draw.line(line, fill=PALETTE[li % len(PALETTE)], width=2)
    img.save(out_png)


def log_summary(stage_dir: str) -> str:
    """Means of the logged quantities over the first and the last fifth of a stage's steps, and its wall time."""
    recs = [json.loads(line) for line in (Path(stage_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    n = max(1, len(recs) // 5)
    keys = [k for k in recs[0] if isinstance(recs[0][k], (int, float)) and k not in ("step", "ms_per_step")]
    parts = []
    for k in keys:
        a = sum(r[k] for r in recs[:n]) / n
        b = sum(r[k] for r in recs[-n:]) / n
        parts.append(f"{k} {a:.4f} -> {b:.4f}")
    wall = recs[-1]["ms_per_step"] * len(recs) / 1000
    return f"{stage_dir}: {len(recs)} steps, ~{wall / 60:.1f} min; first fifth -> last fifth: " + ", ".join(parts)


def draw_retrieval_grid(results: list[dict], bench, out_png: str, tasks=("t2i", "it2i"), per_task=1):
    """For a few MRBench-mini queries: the query, then each checkpoint's top 5 (green frame: relevant)."""
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
            draw.rectangle([cx, y, cx + S - 1, y + S - 1], outline=(0, 170, 0) if ok else (220, 0, 0), width=3)
        draw.text((qw + 5 * (S + pad) + 4, y + S // 2 - 6), Path(res["ckpt"]).name, fill="black")
    img.save(out_png)


# ----------------------------------------------------------------------------------------------------------------------
# Table


def table(results: list[dict]) -> str:
    names = [Path(r["ckpt"]).name for r in results]
    w = max(12, *(len(n) for n in names))
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
        add(f"standard {t} R@1 / R@5 (pool {std0[t]['pool']}" + (f", chance R@5 {chance:.3f})" if chance else ")"),
            lambda r, t=t: r["standard"][t]["R@5"])
        rows[-1] = (rows[-1][0], [f"{r['standard'][t]['R@1']:.3f} / {r['standard'][t]['R@5']:.3f}" for r in results])
    add("standard avg R@1", lambda r: r["standard"]["avg"]["R@1"])
    add("standard avg R@5", lambda r: r["standard"]["avg"]["R@5"])
    add("standard avg MRR", lambda r: r["standard"]["avg"]["MRR"])
    add("query summaries exactly right", lambda r: r["standard"]["avg"]["summary_exact"])
    for t in TASKS:
        add(f"MRBench-mini {t} R@5", lambda r, t=t: r["mrbench"][t])
    add("MRBench-mini avg R@5", lambda r: r["mrbench"]["avg"])
    add("  ... with reference summaries", lambda r: r["headroom"]["reference"])
    add("  ... with empty summaries", lambda r: r["headroom"]["empty"])
    add("near-miss avg R@1", lambda r: r["near_miss"]["avg"]["R@1"])
    for k in sorted(k for k in results[0]["near_miss"]["avg"] if k.startswith("win_")):
        add(f"near-miss win rate vs {k[4:]}", lambda r, k=k: r["near_miss"]["avg"][k])
    for k in sorted(results[0]["probe"]):
        add(f"grain-masking distance ({k})", lambda r, k=k: r["probe"][k])
    add("summary-swap distance", lambda r: r["swap"]["swap_distance"])
    add("  distance between inputs", lambda r: r["swap"]["between_inputs"])
    add("mean pairwise cosine (i2i pool)", lambda r: r["mean_pairwise_cos"])
    rows.append(("non-finite embeddings (standard split)", [str(r["standard"].get("nonfinite", "-")) for r in results]))
    lw = max(len(label) for label, _ in rows)
    lines = []
    for i, (label, vals) in enumerate(rows):
        lines.append(f"| {label:{lw}s} | " + " | ".join(f"{v:>{w}s}" for v in vals) + " |")
        if i == 0:
            lines.append("|" + "-" * (lw + 2) + "|" + "|".join("-" * (w + 2) for _ in vals) + "|")
    return "\n".join(lines)


def _log_stats(ckpt: str) -> dict:
    """From a stage's log.jsonl (if there): its training minutes (mining excluded) and the reward's mean over the
    first and the last fifth of its steps (GRPO runs only)."""
    path = Path(ckpt) / "log.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        return {}
    out = {"minutes": recs[-1]["ms_per_step"] * len(recs) / 60000}
    if "reward_mean" in recs[0]:
        n = max(1, len(recs) // 5)
        out["reward"] = (sum(r["reward_mean"] for r in recs[:n]) / n, sum(r["reward_mean"] for r in recs[-n:]) / n)
    return out


def ladder_table(folder: str) -> str:
    """The learnability ladder: for every stage-3 run in `folder` (one sub-folder per run, as `study.py runs` writes),
    its reward and budget, and how its reward, KL and summaries moved from the first to the last fifth of its steps.
    t = (last - first) / the standard error of that difference over the per-step means: "rises clearly" is t > 3."""
    import statistics
    rows = ["| run | reward | lr | beta | reward first -> last fifth | t | KL last fifth | summary length | "
            "query summaries exact | MRBench-mini avg R@5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg_path in sorted(Path(folder).glob("*/config.json")):
        run = cfg_path.parent
        meta = json.loads(cfg_path.read_text())
        a = meta.get("args", {})
        control = a.get("control") or a.get("rl_objective", "grpo") != "grpo"   # (older runs: --rl_objective)
        if meta.get("stage") != "elva" or control or not (run / "log.jsonl").exists():
            continue
        recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        n = max(2, len(recs) // 5)
        first, last = recs[:n], recs[-n:]

        def mean(rs, k):
            return statistics.mean(r[k] for r in rs) if all(k in r for r in rs) else float("nan")
        r0, r1 = [r["reward_mean"] for r in first], [r["reward_mean"] for r in last]
        se = (statistics.variance(r0) / len(r0) + statistics.variance(r1) / len(r1)) ** 0.5
        t = (statistics.mean(r1) - statistics.mean(r0)) / se if se > 0 else float("nan")
        res = run.parent / f"{run.name}.json"
        mrb = "-"
        if res.exists():
            r = json.loads(res.read_text())
            mrb = f"{(r[0] if isinstance(r, list) else r)['mrbench']['avg']:.3f}"
        rows.append(f"| {run.name} | {a.get('reward', 'paper')} | {a.get('rl_lr'):g} | {a.get('beta'):g} | "
                    f"{statistics.mean(r0):.3f} -> {statistics.mean(r1):.3f} | {t:+.1f} | {mean(last, 'kl'):.4f} | "
                    f"{mean(first, 'summary_len'):.1f} -> {mean(last, 'summary_len'):.1f} | "
                    f"{mean(first, 'query_exact'):.3f} -> {mean(last, 'query_exact'):.3f} | {mrb} |")
    return "\n".join(rows)


def aggregate(results: list[dict]) -> str:
    """Mean +- std over seeds: checkpoints named <run>-s<seed> are grouped by <run> (a markdown table). Where the
    checkpoint's log.jsonl is at hand, also the reward's first-fifth -> last-fifth means and the training minutes."""
    import re
    import statistics
    groups = {}
    for r in results:
        name = re.sub(r"-s\d+$", "", Path(r["ckpt"]).name)
        groups.setdefault(name, []).append(r)
    cols = [("MRBench-mini avg R@5", lambda r: r["mrbench"]["avg"]),
            ("standard avg R@5", lambda r: r["standard"]["avg"]["R@5"]),
            ("standard avg R@1", lambda r: r["standard"]["avg"]["R@1"]),
            ("near-miss R@1", lambda r: r["near_miss"]["avg"]["R@1"]),
            ("win vs binding", lambda r: r["near_miss"]["avg"]["win_binding"]),
            ("win vs relation", lambda r: r["near_miss"]["avg"]["win_relation"]),
            ("grain-masking dist.", lambda r: r["probe"]["all"]),
            ("MRBench-mini, reference summaries", lambda r: r["headroom"]["reference"])]
    lines = ["| run | seeds | " + " | ".join(c for c, _ in cols) + " | reward first -> last fifth | train min |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for name, rs in groups.items():
        cells = []
        for _, get in cols:
            try:
                v = [get(r) for r in rs]
            except KeyError:  # a result written before this column existed
                cells.append("-")
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} +- {sd:.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        logs = [_log_stats(r["ckpt"]) for r in rs]
        rw = [lg["reward"] for lg in logs if "reward" in lg]
        cells.append(f"{statistics.mean(a for a, _ in rw):.3f} -> {statistics.mean(b for _, b in rw):.3f}" if rw
                     else "-")
        mins = [f"{lg['minutes']:.1f}" for lg in logs if "minutes" in lg]
        cells.append(" / ".join(mins) if mins else "-")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint folder (repeat for a side-by-side table)")
    p.add_argument("--queries", type=int, default=200, help="standard-split queries per task")
    p.add_argument("--mrbench_per_task", type=int, default=100, help="MRBench-mini queries per task")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--grid", default=None, help="write a retrieval-grid PNG (top 5 of MRBench-mini queries) here")
    p.add_argument("--curves", nargs="*", default=None, help="stage folders whose log.jsonl to plot (no --ckpt needed)")
    p.add_argument("--curves_png", default="curves.png", help="where --curves writes its PNG")
    g = p.add_argument_group("real data: M-BEIR in UniIR's layout (python mbeir.py --sample DIR writes a sample)")
    g.add_argument("--mbeir", default=None, help="the M-BEIR root (query/, cand_pool/, instructions/, images)")
    g.add_argument("--tasks", default="all", help="comma list of task names, e.g. mscoco_task0,nights_task4; or all")
    g.add_argument("--pool", default="local", choices=["local", "union"], help="each task's own pool or the union pool")
    g.add_argument("--split", default="test", help="query split (query/<split>/)")
    g.add_argument("--run_file", default=None, help="write a TREC run file (qid Q0 did rank score run_id) here")
    g.add_argument("--run_depth", type=int, default=100, help="candidates per query in the run file")
    g.add_argument("--cache", default=None, help="folder for cached pool embeddings (default: <ckpt>/mbeir_cache)")
    g.add_argument("--instruction", default="first", choices=["first", "random"], help="UniIR's prompt per query: "
                   "the first (deterministic) or one at random with --seed (UniIR draws one)")
    g.add_argument("--seed", type=int, default=0, help="seed of --instruction random")
    g = p.add_argument_group("real data: MMEB (VLM2Vec) evaluation rows, one JSON object per line")
    g.add_argument("--mmeb", nargs="+", default=None, help="MMEB jsonl file(s): qry_inst, qry_text, qry_img_path, "
                   "tgt_inst, tgt_text[], tgt_img_path[] (first target the positive)")
    g.add_argument("--mmeb_images", default=".", help="the folder MMEB's image paths are relative to")
    p.add_argument("--ladder", default=None, help="print the learnability-ladder table of a study folder (study.py "
                   "writes one) and exit")
    p.add_argument("--from_json", nargs="+", default=None, help="re-print the tables of earlier --out JSON files "
                   "(no evaluation); several files are concatenated, e.g. runs/study/*.json")
    args = p.parse_args(argv)
    if args.ladder:
        print(ladder_table(args.ladder))
        return
    if args.curves:
        draw_curves(args.curves, args.curves_png)
        print(f"wrote {args.curves_png}")
        for d in args.curves:
            print(log_summary(d))
        if not args.ckpt:
            return
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: expected an integer >= 1")
    for c in args.ckpt:   # a bad path is one line, before any work
        if not (Path(c) / "config.json").is_file():
            stages = sorted(d.name for d in Path(c).glob("*") if (d / "config.json").is_file())
            p.error(f"--ckpt {c}: " + (f"a run folder, not a checkpoint; it holds the stage folders {stages}, e.g. "
                                       f"--ckpt {Path(c) / stages[0]}" if stages else
                                       "no config.json; expected a checkpoint folder written by train.py"))
    torch.set_num_threads(args.threads or elva.default_threads())
    device, autocast = elva.resolve_device(args.device)
    if args.mmeb or args.mbeir:
        import mbeir   # the real-data evaluation lives with its readers (mbeir.py imports this file's metrics)
    if args.mmeb:
        if len(args.ckpt) != 1:
            p.error("--mmeb evaluates one --ckpt at a time")
        ret = elva.Retriever.from_pretrained(args.ckpt[0], device)
        try:
            res = mbeir.evaluate_mmeb(ret, args.mmeb, args.mmeb_images, autocast)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--mmeb: {e} (image paths are read relative to --mmeb_images {args.mmeb_images})") \
                from None
        print(mbeir.mmeb_table(res))
        if args.out:
            elva._atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(res, indent=2)))
        return
    if args.mbeir:
        if len(args.ckpt) != 1:
            p.error("--mbeir evaluates one --ckpt at a time")
        if args.run_depth < 1:
            p.error(f"--run_depth {args.run_depth}: expected an integer >= 1")
        if not Path(args.mbeir).is_dir():
            p.error(f"--mbeir {args.mbeir}: not a folder; expected an M-BEIR root (query/, cand_pool/, instructions/)")
        ret = elva.Retriever.from_pretrained(args.ckpt[0], device)
        res = mbeir.evaluate_mbeir(ret, args.mbeir, [t.strip() for t in args.tasks.split(",") if t.strip()], args.split,
                             args.pool, autocast, args.run_file, args.cache or str(Path(args.ckpt[0]) / "mbeir_cache"),
                             args.run_depth, instruction=args.instruction, seed=args.seed)
        print(mbeir.mbeir_table(res))
        if args.run_file:
            print(f"wrote {args.run_file}")
        if args.out:
            elva._atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(res, indent=2)))
        return
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
    if len(results) > 1:
        print(aggregate(results))
    if args.grid:
        model_world = GrainWorld(WorldConfig(**json.loads((Path(results[0]["ckpt"]) / "config.json").read_text())["world"]))
        draw_retrieval_grid(results, model_world.mrbench_mini(args.mrbench_per_task), args.grid)
        print(f"wrote {args.grid}")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
