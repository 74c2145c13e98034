"""
The study's probes, no training: the reward audit (does R_total pick better summaries among
sampled ones?), where greedy summaries err per grain, the transfer probe's table, and eval.py's
table for a run whose policy writes and whose frozen stage-2 model embeds.

    python -m study audit --ckpt runs/cpu/contrastive [--sample_candidates]
    python -m study grains --ckpt STAGE2 ELVA
    python -m study transfer RUN...
    python -m study eval --ckpt RUN --scorer STAGE2
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

import data
import eval as evaluation
from retriever import Retriever
from reward import ranking_reward, total_reward
from retriever import log_records, write_json
from runtime import Parser, default_threads, fail, resolve_device
from study.rewards import ndcg_reward, rank_reward, zscore_reward
from study.variants import one_grain_apart


# --------------------------------------------------------------------------------------------------
# `python -m study audit --ckpt DIR`: the reward audit, no training. Does the reward point at better
# summaries when they are sampled (then the optimiser is what fails), or the wrong way (then the
# reward is)?


def _avg_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks within each row (1 = smallest), ties averaged. x (N, G) -> (N, G)."""
    less = (x[:, None, :] < x[:, :, None]).sum(-1).float()
    equal = (x[:, None, :] == x[:, :, None]).sum(-1).float()
    return less + (equal + 1) / 2


def group_spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of Spearman's rho between x and y (N, G); a row where either side is
    constant counts 0."""
    a, b = _avg_ranks(x), _avg_ranks(y)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 1e-9, (a * b).sum(1) / den.clamp(min=1e-9),
                       torch.zeros_like(den)).mean().item()


@torch.no_grad()
def audit_task(ret, task, queries, pool, G: int, temperature: float, gen, n_hard: int, n_rand: int,
               rng, autocast,
               sample_candidates: bool = False):
    """One task's MRBench-mini queries: the true pool rank of the positive with each kind of
    query summary, and the rewards of G sampled summaries in the paper's context (positive +
    n_hard hardest + n_rand random candidates of the pool, each with its greedy summary -- or,
    with sample_candidates, with a summary sampled afresh for each of the G rollouts, as the
    paper's rollouts sample every item's words; the true rank stays the query summary's rank in
    the pool with its greedy summaries, what evaluation measures)."""
    Q, instr = len(queries), [data.INSTRUCTIONS[task]] * len(queries)
    items = [q.item for q in queries]
    with autocast():
        ep, _ = ret.embed_items(pool, [None] * len(pool))       # (P, D) the pool's greedy summaries
        b, imgs = ret.batch(items, instr, None)
        greedy = ret.model.generate(b["tokens"], b["attn"], imgs)
        index = torch.arange(Q, device=b["tokens"].device).repeat_interleave(G)
        samples = ret.model.generate(b["tokens"], b["attn"], imgs, temperature=temperature,
                                     generator=gen,
                                     index=index)                              # Q * G, query-major
        kinds = {"greedy": greedy, "empty": [[] for _ in items],
                 "reference": [ret.enc.summary(q.item.summary) for q in queries]}
        emb = {k: ret.embed_given(items, instr, v)[0] for k, v in kinds.items()}
        es, lp = ret.embed_given([it for it in items for _ in range(G)],
                                 [i for i in instr for _ in range(G)], samples,
                                 temperature=temperature)
    rel = evaluation.relevant_indices(task, queries, pool)                           # (Q, P_max)
    ranks = {k: evaluation.ranks_of_best_positive(e, ep, rel) for k, e in emb.items()}
    # (Q, G)
    true = evaluation.ranks_of_best_positive(es, ep, rel.repeat_interleave(G, 0)).view(Q, G).float()
    # the paper's context per query: the positive, the hardest and some random
    # non-relevant pool candidates
    s_greedy = emb["greedy"] @ ep.T                                            # (Q, P)
    ctx = []
    for qi, q in enumerate(queries):
        relevant = set(x for x in rel[qi].tolist() if x >= 0)
        pos = pool.index(q.positive) if q.positive in pool else min(relevant)
        others = [j for j in s_greedy[qi].argsort(descending=True).tolist() if j not in relevant]
        rest = others[n_hard:]
        ctx.append([pos] + others[:n_hard] + rng.sample(rest, min(n_rand, len(rest))))
    ctx = torch.tensor(ctx)                                                    # (Q, C)
    if not sample_candidates:   # every rollout sees the candidates' greedy summaries
        ec = ep.cpu()[ctx][:, None].expand(-1, G, -1, -1)                       # (Q, G, C, D)
    else:   # every context candidate writes G summaries, one per rollout
        cand = [pool[j] for j in ctx.flatten().tolist()]                       # Q * C, query-major
        ec = []
        for i in range(0, len(cand), 64):                         # 64 candidates x G rows at a time
            part = cand[i:i + 64]
            with autocast():
                cb, cimgs = ret.batch(part, [None] * len(part), None)
                index = torch.arange(len(part), device=cb["tokens"].device).repeat_interleave(G)
                cs = ret.model.generate(cb["tokens"], cb["attn"], cimgs, temperature=temperature,
                                        generator=gen, index=index)            # len(part) * G
                repeated = [c for c in part for _ in range(G)]
                ec.append(ret.embed_given(repeated, [None] * len(cs), cs)[0].cpu())
        ec = torch.cat(ec)                                                     # (Q * C * G, D)
        ec = ec.view(Q, ctx.shape[1], G, -1).transpose(1, 2)                   # (Q, G, C, D)
    scores = torch.einsum("qgd,qgcd->qgc", es.view(Q, G, -1).cpu(), ec)         # (Q, G, C)
    gains = torch.stack([torch.tensor([1.0] + [0.5 if one_grain_apart(pool[j].scene,
                                                                      q.positive.scene) else 0.0
                                               for j in row[1:].tolist()])
                         for q, row in zip(queries, ctx)])
    rewards = {"R_total (paper)": total_reward(scores), "R_Rank (paper)": ranking_reward(scores),
               "rank only": rank_reward(scores), "zscore R_total": zscore_reward(scores),
               "ndcg (graded)": ndcg_reward(scores, gains[:, None, :])}
    lengths = torch.tensor([len(x) for x in samples], dtype=torch.float32).view(Q, G)
    # picks that need no label: the sample the model finds likeliest, the medoid of the G sampled
    # embeddings (highest mean cosine to the others), and their normalised mean
    E = es.view(Q, G, -1)                                                      # (Q, G, D) unit
    near = ((E @ E.transpose(1, 2)).sum(-1) - 1) / (G - 1)                     # (Q, G)
    mean = torch.nn.functional.normalize(E.mean(1), dim=-1)                    # (Q, D)
    qi = torch.arange(Q)
    free = {"likeliest": true[qi, lp.view(Q, G).argmax(1).cpu()],
            "medoid": true[qi, near.argmax(1).cpu()],
            "centroid": evaluation.ranks_of_best_positive(mean, ep, rel).float()}
    return ranks, true, rewards, lengths, scores.mean(-1), free


def subcommand(name: str, description: str, queries: int | None = None) -> Parser:
    """The parser of `python -m study NAME`, with --threads and --out (and --queries where it
    evaluates: the queries per task)."""
    p = Parser(prog=f"python -m study {name}", description=description)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    if queries is not None:
        p.add_argument("--queries", type=int, default=queries, help="queries per task")
    return p


def audit(argv):
    p = subcommand("audit", "the reward audit (no training): R@5 on MRBench-mini with greedy / "
                   "empty / reference query summaries, the mean of G sampled ones, the best of G "
                   "chosen by each reward, the oracle best of G, and label-free picks", 100)
    p.add_argument("--ckpt", required=True, help="a checkpoint folder (e.g. runs/cpu/contrastive)")
    p.add_argument("--samples", type=int, default=16, help="G: sampled query summaries per query")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--n_hard", type=int, default=4,
                   help="hardest pool candidates in each reward's context")
    p.add_argument("--n_rand", type=int, default=4,
                   help="random pool candidates in each reward's context")
    p.add_argument("--sample_candidates", action="store_true",
                   help="the context candidates' summaries sampled too, afresh per rollout (the "
                        "paper's rollouts); default: their greedy summaries")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling and the random context")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    a = p.parse_args(argv)
    if a.samples < 2 or a.queries < 1 or not a.temperature > 0:
        fail("--samples / --queries / --temperature", (a.samples, a.queries, a.temperature),
             ">= 2, >= 1, > 0")
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device(a.device)
    ret = Retriever.from_pretrained(a.ckpt, device)
    if not isinstance(ret.meta.get("world"), dict):
        fail("--ckpt", a.ckpt, "a checkpoint trained on GrainWorld (its record has a 'world' "
                               "section)")
    world = data.grain_world(data.WorldConfig(**ret.meta["world"]))
    gen = torch.Generator(device=device).manual_seed(a.seed)
    rng = random.Random(a.seed)
    t0 = time.time()
    parts = []
    for task, (queries, pool) in world.mrbench_mini(a.queries).items():
        parts.append(audit_task(ret, task, queries, pool, a.samples, a.temperature, gen, a.n_hard,
                                a.n_rand, rng, autocast, a.sample_candidates))
        print(f"audit: {task} done ({time.time() - t0:.0f}s)", flush=True)
    true, lengths, mean_cos = (torch.cat([x[i] for x in parts]) for i in (1, 3, 4))   # (N, G) each
    rows = {f"{k} summary": torch.cat([x[0][k] for x in parts]).float()
            for k in ("greedy", "empty", "reference")}
    rows[f"mean of {a.samples} samples"] = true                      # R@5 averaged over the samples
    idx = torch.arange(true.shape[0])
    corr = {}
    for name in parts[0][2]:
        R = torch.cat([x[2][name] for x in parts])                             # (N, G)
        rows[f"best of {a.samples} by {name}"] = true[idx, R.argmax(1)]
        corr[name] = (group_spearman(R, -true), group_spearman(R, lengths),
                      group_spearman(R, mean_cos))
    rows[f"oracle best of {a.samples} (true pool rank)"] = true.min(1).values
    for name in parts[0][5]:   # without the label: what a policy or an inference rule could reach
        label_free = torch.cat([x[5][name] for x in parts])
        rows[f"{name} of the {a.samples} samples (no label)"] = label_free
    res = {"ckpt": a.ckpt, "queries": int(true.shape[0]), "samples": a.samples,
           "sample_candidates": a.sample_candidates,
           "rows": {k: {"R@5": (v <= 5).float().mean().item(), "mean_rank": v.mean().item()}
                    for k, v in rows.items()},
           "spearman": {k: dict(zip(("true_rank", "length", "mean_cos"), v))
                        for k, v in corr.items()}}
    ctx_words = "sampled afresh per rollout" if a.sample_candidates else "their greedy summaries"
    print(f"\nReward audit of {a.ckpt}: MRBench-mini, {res['queries']} queries ({a.queries} per "
          f"task), the pool's greedy summaries; context = positive + {a.n_hard} hardest + "
          f"{a.n_rand} random, {ctx_words} ({time.time() - t0:.0f}s)")
    print("| the query's summary | R@5 | mean rank of the positive |\n|---|---|---|")
    for k, v in res["rows"].items():
        print(f"| {k} | {v['R@5']:.3f} | {v['mean_rank']:.2f} |")
    print("\n| reward | Spearman with the true pool rank (+: better) | with summary length | with "
          "mean cosine |\n|---|---|---|---|")
    for k, v in res["spearman"].items():
        print(f"| {k} | {v['true_rank']:+.2f} | {v['length']:+.2f} | {v['mean_cos']:+.2f} |")
    if a.out:
        write_json(Path(a.out), res)


# --------------------------------------------------------------------------------------------------
# `python -m study grains --ckpt DIR`: where the greedy summaries err, per grain type, and
# `python -m study eval --ckpt DIR --scorer INIT`: eval.py's table for a --scorer frozen run


def grains_of(summary: str) -> dict:
    """A summary read back into its grains: the shapes (entities); the colour and size words
    (attributes); which colour and size go with which shape (bindings); the relations -- a
    caption's ordered (shapes, relation words), a scene's (shape, cell) of each object; None where
    the summary states no relation (a caption without one, a one-object scene)."""
    words = summary.replace(";", " ").split()
    objs, rels, pending = [], [], []
    for i, w in enumerate(words):
        if w in data.SHAPES:
            objs.append((w, pending, []))
            pending = []
        elif w in ("left", "right") and words[i + 1:i + 2] == ["of"] or w in ("above", "below"):
            rels.append(w)
        elif w in data.ROWS or w in data.COLS:
            if objs:
                objs[-1][2].append(w)                                      # a scene's cell
        elif w not in ("and", "of"):
            pending.append(w)                                              # colours, sizes, ...
    shapes = [sh for sh, _, _ in objs]
    attrs = [w for _, ws, _ in objs for w in ws]
    if rels:
        relation = (shapes, rels)
    elif any(cell for _, _, cell in objs) and len(objs) > 1:
        relation = sorted((sh, tuple(cell)) for sh, _, cell in objs)
    else:
        relation = None
    return {"entity": sorted(shapes),
            "attribute": sorted(w for w in attrs if w in data.COLORS or w in data.SIZES),
            "binding": sorted((w, sh) for sh, ws, _ in objs for w in ws),
            "relation": relation}


def grain_errors(ret, bench, autocast) -> dict:
    """On MRBench-mini: the share of greedy query and candidate summaries that state each grain
    type as the reference summary does (relations counted where the reference states one)."""
    hits = {side: {g: [] for g in ("entity", "attribute", "binding", "relation")}
            for side in ("query", "candidate")}
    for task, (queries, pool) in bench.items():
        sides = (("query", [q.item for q in queries], [data.INSTRUCTIONS[task]] * len(queries)),
                 ("candidate", pool, [None] * len(pool)))
        for side, items, instr in sides:
            _, texts = ret.embed_items(items, instr, autocast=autocast())
            for it, text in zip(items, texts):
                want, got = grains_of(it.summary), grains_of(text)
                for g in hits[side]:
                    if want[g] is not None:
                        hits[side][g].append(want[g] == got[g])
    return {side: {g: sum(v) / max(1, len(v)) for g, v in gs.items()} for side, gs in hits.items()}


def grains(argv):
    p = subcommand("grains", "where greedy summaries err, per grain type, on MRBench-mini "
                   "(query and candidate summaries)", 100)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device("auto")
    res = {}
    for c in a.ckpt:
        ret = Retriever.from_pretrained(c, device)
        bench = data.grain_world(data.WorldConfig(**ret.meta["world"])).mrbench_mini(a.queries)
        res[c] = grain_errors(ret, bench, autocast)
    print("| checkpoint | summaries | entity | attribute | binding | relation |")
    print("|---|---|---|---|---|---|")
    for c, r in res.items():
        for side, v in r.items():
            print(f"| {c} | {side} | " + " | ".join(f"{v[g]:.3f}" for g in v) + " |")
    if a.out:
        write_json(Path(a.out), res)


def mean_t(xs: list[float]) -> tuple[float, float]:
    """The mean of per-step values and its t (mean / standard error); t ~ 0: no effect."""
    import statistics
    if len(xs) < 2:
        return (xs[0] if xs else float("nan")), float("nan")
    se = statistics.stdev(xs) / len(xs) ** 0.5
    return statistics.mean(xs), (statistics.mean(xs) / se if se > 0 else float("nan"))


def transfer(argv):
    p = Parser(prog="python -m study transfer",
               description="the transfer probe's table: per stage-3 run, does an update pay on "
               "its own instances (delta_same) and on held-out ones (delta_other)?")
    p.add_argument("runs", nargs="+", help="stage-3 folders whose log.jsonl holds the probe")
    a = p.parse_args(argv)
    print("| run | probed steps | delta_same (t) | delta_other (t) | reward first -> last fifth |"
          " held-out reward first -> last |\n|---|---|---|---|---|---|")
    for run in a.runs:
        recs = log_records(run)
        probed = [r for r in recs if "delta_same" in r]
        if not probed:
            print(f"| {Path(run).name} | 0 | - | - | - | - |")
            continue
        (ds, ts), (do, to) = (mean_t([r[k] for r in probed]) for k in ("delta_same", "delta_other"))
        n = max(1, len(recs) // 5)
        r0, r1 = (sum(r["reward_mean"] for r in part) / len(part) for part in (recs[:n], recs[-n:]))
        print(f"| {Path(run).name} | {len(probed)} | {ds:+.4f} ({ts:+.1f}) | {do:+.4f} ({to:+.1f}) "
              f"| {r0:.3f} -> {r1:.3f} | {probed[0]['other']:.3f} -> {probed[-1]['other']:.3f} |")


class WordsFromScorer:
    """A retriever whose summaries one model writes and another embeds at [RET] (--scorer frozen:
    the policy writes, the frozen stage-2 model embeds); what eval.evaluate reads of a Retriever."""

    def __init__(self, writer, scorer):
        self.writer, self.scorer = writer, scorer
        self.model, self.enc, self.tok = scorer.model, scorer.enc, scorer.tok
        self.meta = writer.meta
        self.device = scorer.device

    def summarise(self, items, instructions, **kw):
        return self.writer.summarise(items, instructions, **kw)

    def batch(self, items, instructions, summaries):
        return self.scorer.batch(items, instructions, summaries)

    def embed_given(self, *args, **kw):   # the given words: the scorer embeds them
        return self.scorer.embed_given(*args, **kw)

    @torch.no_grad()
    def embed_items(self, items, instructions, batch_size: int = 256, autocast=None, **_):
        embs, texts = [], []
        for i in range(0, len(items), batch_size):
            its, ins = items[i:i + batch_size], instructions[i:i + batch_size]
            with autocast or torch.autocast("cpu", enabled=False):
                summ = self.writer.summarise(its, ins)
                b, imgs = self.scorer.batch(its, ins, summ)
                embs.append(self.scorer.model.embed(b, imgs).float())
            texts += [self.enc.decode(x) for x in summ]
        return torch.cat(embs), texts


def eval_frozen(argv):
    p = subcommand("eval", "eval.py's table for a --scorer frozen run: the checkpoint writes the "
                   "summaries, --scorer embeds (--queries: of the standard split)", 200)
    p.add_argument("--ckpt", required=True, help="the policy (a --scorer frozen run's checkpoint)")
    p.add_argument("--scorer", required=True, help="the frozen stage-2 checkpoint (its --init)")
    p.add_argument("--mrbench_per_task", type=int, default=100,
                   help="MRBench-mini queries per task")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device("auto")
    ret = WordsFromScorer(Retriever.from_pretrained(a.ckpt, device),
                          Retriever.from_pretrained(a.scorer, device))
    r = evaluation.evaluate(a.ckpt, a.queries, a.mrbench_per_task, device, autocast, ret=ret)
    print(evaluation.table([r]))
    if a.out:
        write_json(Path(a.out), [r])
