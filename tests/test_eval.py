"""Evaluation: metrics by hand, GrainWorld's benchmarks, the precondition rows."""

import math
import random
from contextlib import nullcontext

import pytest
import torch

import data
import eval as evaluation
import retriever
from data import Obj, Scene
from tests.helpers import (tiny_model, teacher_forced)


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
    s, i = retriever.Retriever.search(q, c, k=5, chunk=64)  # streamed in chunks of 64
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
