"""Real data: M-BEIR in UniIR's layout and MMEB, on the repository's own sample."""

import json
import random
from contextlib import nullcontext

import pytest
import torch

import data
import eval as evaluation
import mbeir as realdata
import retriever
import train
from data import Obj, Scene
from tests.helpers import (tiny_model, untimed)


def test_mbeir_reader_round_trip(tmp_path):
    img = data.render(Scene.of([Obj("circle", "red", "large", 0, 0)]), 32, 0)
    img.save(tmp_path / "a.png")
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"did": "c1", "txt": None, "img_path": "a.png", "modality": "image"},
        {"did": "c2", "txt": "a blue square", "img_path": None, "modality": "text"}]) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"qid": "q1", "query_txt": "a red circle",
                                                  "query_img_path": None, "query_modality": "text",
                                                  "pos_cand_list": ["c1"]}) + "\n")
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
    assert (both.text == "picture 3" and both.image_path.endswith("3.jpg")
            and pool.modalities[pool.index["8:3"]] == "image,text")
    q3, p3 = realdata.mbeir_paths(mbeir, "sample_task3")
    pool3 = realdata.read_mbeir_pool(p3, mbeir)
    qs3 = realdata.read_mbeir_queries(q3, pool3, mbeir, ins)
    assert (qs3.negatives[0] == [pool3.index["9:101"]] and qs3.items[0].text == ""
            and qs3.items[0].image_path)
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
    good = {"qid": "9:9", "query_txt": "x", "query_img_path": None, "query_modality": "text",
            "pos_cand_list": ["9:1"]}
    lacking = {k: v for k, v in good.items() if k != "pos_cand_list"}
    cases = [
        ('{"qid": "9:0", "query_txt": "x"', "mbeir_sample_task0_test.jsonl:2: malformed JSON"),
        (json.dumps(lacking),
         r"mbeir_sample_task0_test.jsonl:2: record lacks field\(s\) \['pos_cand_list'\]"),
        (json.dumps({**good, "query_img_path": "gone.jpg"}),
         "mbeir_sample_task0_test.jsonl:2: image .*gone.jpg not found"),
        (json.dumps({**good, "pos_cand_list": ["9:777"]}),
         r"test.jsonl:2: positive candidate\(s\) \['9:777'\] .* not in the pool"),
        (json.dumps({**good, "query_modality": "audio"}),
         "test.jsonl:2: no instruction for dataset 9, query modality 'audio'"),
    ]
    for bad, pattern in cases:
        q.write_text("\n".join([lines[0], bad]) + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            realdata.read_mbeir_queries(q, pool, root, ins)
    p.write_text(p.read_text() + json.dumps({"did": "9:0", "txt": "dup", "img_path": None,
                                             "modality": "text"}) + "\n")
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
    split_pool = "mbeir_sample_task0_test_cand_pool.jsonl"
    (local / "mbeir_sample_task0_cand_pool.jsonl").rename(local / split_pool)
    assert realdata.mbeir_paths(root, "sample_task0")[1].name == split_pool
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
    args = ["--ckpt", str(tmp_path / "ck"), "--mbeir", str(mbeir), "--run_file", str(run),
            "--run_depth", "4", "--cache", str(tmp_path / "cache"), "--out",
            str(tmp_path / "m.json"), "--threads", "1"]
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
    assert (q.task == "sample_task0"
            and q.instruction == "Retrieve an image that matches the given caption.")
    assert (src.pool.dids[src.positives[0][0]] == "9:0"
            and q.positive is src.pool.items[src.positives[0][0]])
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
    train.main(["--preset", "smoke", "--mbeir", str(mbeir), "--steps", "3", "--rl_steps", "2",
                "--out", str(out), "--threads", "1", "--vocab_size", "400"])
    meta = retriever.read_checkpoint(out / "elva")[3]
    assert (meta["mbeir"]["tasks"] == ["sample_task0", "sample_task3", "samplecirr_task8"]
            and "world" not in meta)
    tok = retriever.load_tokenizer(out / "tokenizer.json")
    caption = realdata.read_mbeir_train(mbeir, ["all"]).queries[0].item.text
    # BPE merges learnt from the real text
    assert len(tok.encode(caption).ids) < len(caption.encode()) / 2
    for c in ("contrastive", "elva"):
        res = json.loads((out / f"eval_{c}.json").read_text())
        assert set(res) == {"sample_task0", "sample_task3", "samplecirr_task8", "avg"}
    with pytest.raises(SystemExit,
                       match="--mbeir .*: expected an M-BEIR root holding query/train/"):
        train.get_args(["--mbeir", str(tmp_path)])

def test_mmeb_eval_by_hand(tmp_path):
    rows = [{"qry_inst": "", "qry_text": q, "qry_img_path": "", "tgt_inst": "", "tgt_text": t,
             "tgt_img_path": []}
            for q, t in (("q0", ["a", "b", "c"]), ("q1", ["d", "e"]), ("q2", ["f", "g", "h", "i"]))]
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
    assert toy["P@1"] == pytest.approx(1 / 3)
    assert toy["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
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
    evaluation.main(["--ckpt", str(tmp_path / "ck"), "--mmeb", *files, "--mmeb_images", str(mbeir),
                     "--threads", "1"])
    assert f"| {files[1]} | 8 |" in capsys.readouterr().out             # files[1]: sample_t2i.jsonl
    with pytest.raises(SystemExit, match="--mmeb: .*sample_i2t.jsonl:1: image .* not found"):
        evaluation.main(["--ckpt", str(tmp_path / "ck"), "--mmeb", *files, "--threads", "1"])
