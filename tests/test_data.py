"""GrainWorld and the stages' data: relevance, near misses, splits, batches."""

import random

import pytest
import torch

import data
import retriever
import train
from data import Caption, Item, Mention, Obj, Scene


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
    idx = retriever.balanced_negatives(scores, rel, n_hard=2, n_rand=2, threshold=0.95,
                                  generator=torch.Generator())
    # 0 is above the threshold, 1 is relevant
    assert idx[0, :2].tolist() == [2, 3]
    assert set(idx[0, 2:].tolist()) <= {0, 4, 5, 6} and len(set(idx[0].tolist())) == 4
    with pytest.raises(ValueError, match="fewer than"):
        retriever.balanced_negatives(scores, rel, 4, 3, 0.95, torch.Generator())
    # too few below the threshold
    idx = retriever.balanced_negatives(scores, rel, 6, 0, 0.95, torch.Generator())
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


def test_the_recipes_batches(world):
    """Stage 0's batch holds images with their reference summaries and asks for the next-token
    loss alone; stage 1's premises are a scene's summary written as text where --scene_premises
    says; a replayed stage takes the earlier stage's batch every N-th step, from seeds of its own.
    """
    args = train.get_args(["--preset", "smoke", "--scene_premises", "1", "--batch_size", "8"])
    d = data.make_describe_inputs(args, world, 0)
    assert d.lm_only and d.blocks == 1 and all(it.scene is not None for it in d.items)
    assert [it.summary for it in d.items] == [it.scene.summary() for it in d.items]
    assert not any(d.drop) and d.false_neg.shape == (8, 0)
    t = data.make_text_inputs(args, world, 0)
    scenes = {s.summary() for s in world.splits["train"]}
    assert all(it.text in scenes and it.caption is None for it in t.items[:8])
    args.scene_premises = 0.0
    assert all(it.caption is not None for it in data.make_text_inputs(args, world, 0).items[:8])
    kinds = [train.replayed(data.make_text_inputs, data.make_describe_inputs, 4, args, world,
                            step).lm_only for step in range(8)]
    assert kinds == [False, False, False, True] * 2
    assert train.replayed(data.make_text_inputs, data.make_describe_inputs, 0, args, world,
                          3).lm_only is False
