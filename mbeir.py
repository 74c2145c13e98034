"""
Real retrieval data: readers for UniIR's M-BEIR release and MMEB's evaluation rows, a sample writer,
M-BEIR as the stages' data, and the evaluation by UniIR's protocol (eval.py --mbeir calls it).

    python mbeir.py --sample DIR                    # a small M-BEIR-format folder (no downloads)
    python train.py --mbeir DIR --train_tasks all   # stages 2-3 on M-BEIR (training_source)
    python eval.py --ckpt runs/x/contrastive --mbeir DIR   # UniIR's protocol
    python eval.py --ckpt runs/x/contrastive --mmeb DIR/mmeb/*.jsonl --mmeb_images DIR

The paper trains stage 2 on M-BEIR (8 task types, 10 datasets, ~1.1M pairs) and ELVA on 1% of each
dataset, and reports M-BEIR's 16 tasks (ELVA, Section 4). GrainWorld (data.py) is this project's
default data; M-BEIR gives the stages the same interface (data.Source).

M-BEIR's layout under its root (ids are "<dataset_id>:<n>"; image paths relative to the root; texts
may be null or ""):
  query/<split>/mbeir_<dataset>_task<N>_<split>.jsonl    qid, query_txt, query_img_path,
                                                         query_modality, pos_cand_list,
                                                         neg_cand_list, task_id
  cand_pool/local/mbeir_<dataset>_task<N>_cand_pool.jsonl and
  cand_pool/global/mbeir_union_<split>_cand_pool.jsonl   did, txt, img_path, modality
  qrels/<split>/mbeir_<dataset>_task<N>_<split>_qrels.txt   qid 0 did relevance task_id
  instructions/query_instructions.tsv                    a header; query modality, candidate
                                                         modality, task, dataset id, prompts
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from retriever import (atomic_write, n_nonfinite, ndcg_at_k, ranked_top_k, ranks_of_best_positive,
                       recall_mrr)

from data import (TEMPLATE_TEXT, BadInput, GrainWorld, Item, MissingInput, Pairs, Query, Source,
                  WorldConfig, full_caption, random_caption, render)


# ----------------------------------------------------------------------------------------
# Readers: every record and image checked before any work; an error names the file and line


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise MissingInput(f"M-BEIR file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: malformed JSON record ({e.msg}); expected one JSON "
                               f"object per line") from e
            if not isinstance(row, dict):
                raise BadInput(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise BadInput(f"{path}:{n}: record lacks field(s) {missing}; expected "
                               f"{list(required)}")
            row["_line"] = n
            rows.append(row)
    return rows


def check_image(path) -> None:
    """An image file's header read and checked (Pillow's verify) before any embedding: a broken
    image in a large pool fails at once, named."""
    try:
        with Image.open(path) as img:
            img.verify()
            if 0 in img.size:
                raise ValueError(f"it has {img.size[0]}x{img.size[1]} pixels")
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"image {path} could not be read ({e}); expected an image file Pillow "
                       f"can open") from e


def _real_item(path: Path, n: int, text, img, image_root: Path, check: bool = True) -> Item:
    """A record's item; with check, its image file is there and its header reads."""
    text = (text or "").strip()
    if img:
        img_path = image_root / img
        if check and not img_path.is_file():
            raise MissingInput(f"{path}:{n}: image {img_path} not found")
        if check:
            check_image(img_path)
        return Item(text=text, image_path=str(img_path))
    if not text:
        raise BadInput(f"{path}:{n}: record has neither text nor image; expected at least one")
    return Item(text=text)


def read_mbeir_instructions(path) -> dict[tuple[str, str, str], list[str]]:
    """query_instructions.tsv -> {(dataset id, query modality, candidate modality): [prompts]}."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"M-BEIR instructions {path} not found; expected "
                           f"instructions/query_instructions.tsv")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], 2):   # a header
        if not line.strip():
            continue
        parts = line.split("\t")
        prompts = [p.strip() for p in parts[4:] if p.strip()]
        if len(parts) < 5 or not prompts:
            raise BadInput(f"{path}:{n}: expected tab-separated query modality, candidate "
                           f"modality, task, dataset id and at least one prompt; got "
                           f"{len(parts)} fields")
        out[(parts[3].strip(), parts[0].strip(), parts[1].strip())] = prompts
    return out


@dataclass
class MBeirPool:
    """A candidate pool: items, their ids and modalities, and where each id sits."""
    path: Path
    items: list[Item]
    dids: list[str]
    modalities: list[str]
    index: dict[str, int]


def _summary_of(path: Path, row: dict, summary_field: str | None) -> str:
    """A record's reference summary: its `summary_field` (training on data that has one), else
    none (an empty summary: [RET] right after the prompt)."""
    value = row.get(summary_field) if summary_field else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{path}:{row['_line']}: field {summary_field!r} is "
                       f"{type(value).__name__}; expected a string (the summary) or null")
    return value.strip()


def read_mbeir_pool(path, image_root, check_images: bool = True,
                    summary_field: str | None = None) -> MBeirPool:
    path = Path(path)
    rows = _read_jsonl(path, ("did", "txt", "img_path", "modality"))
    pool = MBeirPool(path, [], [], [], {})
    for r in rows:
        did = str(r["did"])
        if did in pool.index:
            raise BadInput(f"{path}:{r['_line']}: candidate id {did!r} appears twice (first at "
                           f"record {pool.index[did] + 1})")
        pool.index[did] = len(pool.items)
        item = _real_item(path, r["_line"], r["txt"], r["img_path"], Path(image_root),
                          check_images)
        pool.items.append(replace(item, summary=_summary_of(path, r, summary_field)))
        pool.dids.append(did)
        pool.modalities.append(str(r["modality"]))
    return pool


@dataclass
class MBeirQueries:
    """The queries of one M-BEIR task file, with what evaluation and training need of each."""
    path: Path
    items: list[Item]
    qids: list[str]
    task_ids: list[int | None]
    modalities: list[str]
    instructions: list[str | None]
    positives: list[list[int]]   # pool indices of its own dataset's positives (training)
    negatives: list[list[int]]   # pool indices of neg_cand_list entries in the pool (often none)
    relevant: list[list[int]]    # pool indices of every qrels positive in the pool (evaluation)
    missed: int = 0              # queries none of whose relevant candidates is in the pool


def read_qrels(path) -> dict[str, list[str]]:
    """UniIR's qrels file (qid 0 did relevance [task_id], a line each) -> {qid: [relevant ids]}:
    relevance > 0 is relevant, as UniIR reads it."""
    out: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            relevance = float(parts[3])
        except (IndexError, ValueError):
            raise BadInput(f"{path}:{n}: expected 'qid 0 did relevance [task_id]', got "
                           f"{line!r}") from None
        if relevance > 0:
            out.setdefault(parts[0], []).append(parts[2])
    if not out:
        raise BadInput(f"{path}: no relevant pair (relevance > 0); expected UniIR's qrels lines")
    return out


def read_mbeir_queries(path, pool: MBeirPool, image_root, instructions: dict | None = None,
                       same_dataset_positives: bool = True, check_images: bool = True,
                       summary_field: str | None = None, qrels: dict | None = None,
                       strict: bool = True, instruction_rng: random.Random | None = None):
    """A query file against a pool, as UniIR reads it: relevant are the qrels pairs (else the
    pos_cand_list), whatever their dataset; a query with none in the pool is a miss (counted).
    Its own dataset's positives pick its instruction (UniIR's first prompt, or one drawn with
    instruction_rng) and are its training pairs; strict: they must be in the pool."""
    path = Path(path)
    required = ("qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list")
    out = MBeirQueries(path, [], [], [], [], [], [], [], [])
    seen = {}
    for r in _read_jsonl(path, required):
        n, qid = r["_line"], str(r["qid"])
        if qid in seen:   # qrels are keyed by qid: a second query would take the first's
            raise BadInput(f"{path}:{n}: qid {qid} already on line {seen[qid]}; expected each "
                           f"query once")
        seen[qid] = n
        pos = [str(p) for p in r["pos_cand_list"]] if isinstance(r["pos_cand_list"], list) else []
        if not pos:
            raise BadInput(f"{path}:{n}: pos_cand_list must be a non-empty list of candidate ids")
        dataset = qid.split(":")[0]
        own = [p for p in pos if not same_dataset_positives or p.split(":")[0] == dataset]
        if not own:
            raise BadInput(f"{path}:{n}: no positive of query {qid} is from its own dataset "
                           f"{dataset}")
        if strict and any(p not in pool.index for p in own):
            missing = [p for p in own if p not in pool.index]
            raise BadInput(f"{path}:{n}: positive candidate(s) {missing} of query {qid} are not "
                           f"in the pool {pool.path}")
        kept = [p for p in own if p in pool.index] or [p for p in pos if p in pool.index]
        listed = pos if qrels is None else qrels.get(qid, [])
        relevant = [pool.index[p] for p in dict.fromkeys(listed) if p in pool.index]
        out.missed += not relevant
        instruction = None
        if instructions is not None:
            instruction = _instruction(path, n, dataset, r, pool, kept, instructions,
                                       instruction_rng)
        item = _real_item(path, n, r["query_txt"], r["query_img_path"], Path(image_root),
                          check_images)
        out.items.append(replace(item, summary=_summary_of(path, r, summary_field)))
        out.qids.append(qid)
        out.task_ids.append(r.get("task_id"))
        out.modalities.append(str(r["query_modality"]))
        out.instructions.append(instruction)
        out.positives.append([pool.index[p] for p in kept])
        negs = r.get("neg_cand_list") or []
        out.negatives.append([pool.index[str(d)] for d in negs if str(d) in pool.index])
        out.relevant.append(relevant)
    return out


def _instruction(path, n, dataset, r, pool, kept, instructions, rng) -> str:
    """UniIR's prompt for (dataset, query modality, the positive's modality); a query whose
    positives are all outside the pool (a miss) takes the dataset's first prompt for its query
    modality."""
    query_modality = str(r["query_modality"])
    if kept:
        key = (dataset, query_modality, pool.modalities[pool.index[kept[0]]])
    else:
        key = next((k for k in instructions if k[:2] == (dataset, query_modality)), None)
    if key not in instructions:
        cand = key[2] if key else "any"
        raise BadInput(f"{path}:{n}: no instruction for dataset {dataset}, query modality "
                       f"{query_modality!r}, candidate modality {cand!r} in "
                       f"query_instructions.tsv")
    prompts = instructions[key]
    return rng.choice(prompts) if rng else prompts[0]


def mbeir_tasks(root, split: str = "test") -> list[str]:
    """The task names ("mscoco_task0", ...) that have a query file for this split."""
    files = sorted((Path(root) / "query" / split).glob(f"mbeir_*_{split}.jsonl"))
    return [f.name[len("mbeir_"):-len(f"_{split}.jsonl")] for f in files]


def mbeir_paths(root, task: str, split: str = "test", pool: str = "local") -> tuple[Path, Path]:
    """-> (query file, pool file) of a task: pool 'local' -- the task's own; its split's pool
    `mbeir_<task>_<split>_cand_pool.jsonl` where the release has one (MSCOCO's 5K-image /
    25K-caption test pools), else `mbeir_<task>_cand_pool.jsonl` -- or 'union'."""
    root = Path(root)
    q = root / "query" / split / f"mbeir_{task}_{split}.jsonl"
    if pool == "local":
        p = root / "cand_pool" / "local" / f"mbeir_{task}_{split}_cand_pool.jsonl"
        if not p.is_file():
            p = root / "cand_pool" / "local" / f"mbeir_{task}_cand_pool.jsonl"
    elif pool == "union":
        p = root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"
    else:
        raise BadInput(f"pool must be 'local' or 'union', got {pool!r}")
    return q, p


@dataclass
class MBeirTrain:
    """What training reads from M-BEIR: one pool (the union pool, or the tasks' local pools
    merged by id) and the training tasks' queries against it; positives[i] / negatives[i] (the
    neg_cand_list) are pool indices."""
    root: Path
    tasks: list[str]
    split: str
    pool_kind: str              # "union" or "local"
    summary_field: str | None
    pool: MBeirPool
    queries: list[Query]
    positives: list[list[int]]
    negatives: list[list[int]]

    def texts(self) -> list[str]:
        """The text a tokenizer for this data is trained on."""
        return ([*TEMPLATE_TEXT] + sorted({q.instruction for q in self.queries if q.instruction})
                + [t for q in self.queries for t in (q.item.text, q.item.summary) if t]
                + [t for it in self.pool.items for t in (it.text, it.summary) if t])


def read_mbeir_train(root, tasks: list[str], split: str = "train", pool: str = "union",
                     summary_field: str | None = None) -> MBeirTrain:
    """M-BEIR's training queries of `tasks` (["all"]: every task with a query file for `split`)
    and the pool they retrieve from, every record and image checked first. Instructions as in
    UniIR; same-dataset positives."""
    root = Path(root)
    known = mbeir_tasks(root, split)
    tasks = known if tasks == ["all"] else tasks
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise BadInput(f"M-BEIR task(s) {unknown or tasks} have no query file under "
                       f"{root / 'query' / split}; expected some of {known}")
    instructions = read_mbeir_instructions(root / "instructions" / "query_instructions.tsv")
    paths = [mbeir_paths(root, t, split, pool) for t in tasks]
    merged = MBeirPool(paths[0][1], [], [], [], {})
    for ppath in dict.fromkeys(p for _, p in paths):   # each pool file once; an id kept once
        part = read_mbeir_pool(ppath, root, summary_field=summary_field)
        for item, did, mod in zip(part.items, part.dids, part.modalities):
            if did not in merged.index:
                merged.index[did] = len(merged.items)
                merged.items.append(item)
                merged.dids.append(did)
                merged.modalities.append(mod)
    out = MBeirTrain(root, tasks, split, pool, summary_field, merged, [], [], [])
    for task, (qpath, _) in zip(tasks, paths):
        qs = read_mbeir_queries(qpath, merged, root, instructions, summary_field=summary_field)
        for item, ins, pos, neg in zip(qs.items, qs.instructions, qs.positives, qs.negatives):
            out.queries.append(Query(task, item, merged.items[pos[0]], instruction=ins))
            out.positives.append(pos)
            out.negatives.append([n for n in neg if n not in pos])
    if len(merged.items) < 2:
        raise BadInput(f"M-BEIR pool {paths[0][1]} has {len(merged.items)} candidate(s); "
                       f"training needs negatives")
    return out


def read_mbeir(queries_path, pool_path, image_root="."):
    """The simple form: a query file and a pool -> (query items, pool items, positive indices)."""
    pool = read_mbeir_pool(pool_path, image_root)
    qs = read_mbeir_queries(queries_path, pool, image_root, same_dataset_positives=False)
    return qs.items, pool.items, [set(p) for p in qs.positives]


def _untoken(text) -> str:
    """VLM2Vec's texts carry its image placeholder; our template places the image itself."""
    return (text or "").replace("<|image_1|>", " ").strip()


def read_mmeb(path, image_root=".") -> list[tuple[Item, str, list[Item], str]]:
    """MMEB (VLM2Vec) evaluation rows -> [(query, its instruction, targets, their instruction)],
    the first target the positive. Fields: qry_inst, qry_text, qry_img_path, tgt_inst,
    tgt_text[], tgt_img_path[]."""
    path, root = Path(path), Path(image_root)
    out = []
    for r in _read_jsonl(path, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")):
        n = r["_line"]
        texts, imgs = r["tgt_text"] or [], r["tgt_img_path"] or []
        if not isinstance(texts, list) or not isinstance(imgs, list) or not (texts or imgs):
            raise BadInput(f"{path}:{n}: tgt_text and tgt_img_path must be lists, at least one "
                           f"non-empty")
        if texts and imgs and len(texts) != len(imgs):   # which text goes with which image?
            raise BadInput(f"{path}:{n}: {len(texts)} tgt_text beside {len(imgs)} tgt_img_path; "
                           f"expected one list, or two of one length (target i: text i, image i)")
        width = max(len(texts), len(imgs))
        texts, imgs = texts + [""] * (width - len(texts)), imgs + [None] * (width - len(imgs))
        query = _real_item(path, n, _untoken(r["qry_text"]), r["qry_img_path"], root)
        targets = [_real_item(path, n, _untoken(t), i, root) for t, i in zip(texts, imgs)]
        out.append((query, r.get("qry_inst") or None, targets, r.get("tgt_inst") or None))
    return out


# ----------------------------------------------------------------------------------------
# A sample in M-BEIR's layout, drawn from GrainWorld (python mbeir.py --sample DIR)


def _sample_image(i: int) -> str:
    return f"mbeir_images/sample/{i}.jpg"


def write_mbeir_sample(root) -> Path:
    """A small M-BEIR-format folder for the tests and for trying the commands: two datasets,
    local and union pools, qrels, instructions, non-square JPEGs, null and empty texts, a
    positive from another dataset, empty negative lists. Only into a new or empty folder (in a
    real M-BEIR root it would write over UniIR's own file names)."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BadInput(f"--sample {root}: expected a new or empty folder (it holds files; the "
                       f"sample uses M-BEIR's own file names and would write over them)")
    rng = random.Random(0)
    scenes = GrainWorld(WorldConfig(seed=11, n_train=12, n_val=0, n_test=0)).splits["train"]
    (root / "mbeir_images" / "sample").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):   # non-square JPEGs, as real photos are
        render(s, 48, i).resize((64, 48), Image.BICUBIC).save(root / _sample_image(i))
    caps = [full_caption(rng, s) for s in scenes]
    img = _sample_image
    # the union pool: dataset 9's images (text null or ""), its captions, dataset 8's image + text
    pool9_img = [{"did": f"9:{i}", "txt": None if i % 2 else "", "img_path": img(i),
                  "modality": "image", "src_content": None} for i in range(12)]
    pool9_txt = [{"did": f"9:{100 + i}", "txt": caps[i].text(), "img_path": None,
                  "modality": "text", "src_content": None} for i in range(12)]
    pool8 = [{"did": f"8:{i}", "txt": f"picture {i}", "img_path": img(i),
              "modality": "image,text", "src_content": None} for i in range(12)]
    t0 = [{"qid": f"9:{i}", "query_txt": random_caption(rng, scenes[i]).text(),
           "query_img_path": None, "query_modality": "text", "query_src_content": None,
           "pos_cand_list": [f"9:{i}"] + (["8:0"] if i == 0 else []), "neg_cand_list": [],
           "task_id": 0} for i in range(6)]
    t3 = [{"qid": f"9:{50 + i}", "query_txt": None, "query_img_path": img(i),
           "query_modality": "image", "query_src_content": None,
           "pos_cand_list": [f"9:{100 + i}"], "neg_cand_list": [f"9:{101 + i}"], "task_id": 3}
          for i in range(6)]
    t8 = [{"qid": f"8:{50 + i}", "query_txt": "the same scene", "query_img_path": img(i),
           "query_modality": "image,text", "query_src_content": None,
           "pos_cand_list": [f"8:{i}"], "neg_cand_list": [], "task_id": 8} for i in range(6)]
    files = {"cand_pool/local/mbeir_sample_task0_cand_pool.jsonl": pool9_img,
             "cand_pool/local/mbeir_sample_task3_cand_pool.jsonl": pool9_txt,
             "cand_pool/local/mbeir_samplecirr_task8_cand_pool.jsonl": pool8}
    for split in ("test", "train"):   # the same queries, twice: a train split for train.py --mbeir
        union = pool9_img + pool9_txt + pool8
        files[f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl"] = union
        for task, rows in (("sample_task0", t0), ("sample_task3", t3), ("samplecirr_task8", t8)):
            files[f"query/{split}/mbeir_{task}_{split}.jsonl"] = rows
    # MMEB (VLM2Vec) rows: a caption -> its image among 4, an image -> its caption among 4
    files["mmeb/sample_t2i.jsonl"] = [
        {"qry_inst": "Find the image the caption describes:", "qry_text": caps[i].text(),
         "qry_img_path": "", "tgt_inst": "", "tgt_text": ["", "", "", ""],
         "tgt_img_path": [img((i + k) % 12) for k in range(4)]} for i in range(8)]
    files["mmeb/sample_i2t.jsonl"] = [
        {"qry_inst": "Describe the image:", "qry_text": "", "qry_img_path": img(i), "tgt_inst": "",
         "tgt_text": [caps[(i + k) % 12].text() for k in range(4)], "tgt_img_path": []}
        for i in range(8)]
    for name, rows in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if name.startswith("query/"):
            split = name.split("/")[1]
            qrels = root / "qrels" / split / Path(name).name.replace(".jsonl", "_qrels.txt")
            qrels.parent.mkdir(parents=True, exist_ok=True)
            qrels.write_text("".join(f"{r['qid']} 0 {p} 1 {r['task_id']}\n"
                                     for r in rows for p in r["pos_cand_list"]))
    (root / "instructions").mkdir(exist_ok=True)
    (root / "instructions" / "query_instructions.tsv").write_text(
        "query_modality\tcand_modality\ttask\tdataset_id\tprompt_1\tprompt_2\n"
        "text\timage\t0\t9\tRetrieve an image that matches the given caption.\t"
        "Find a matching picture.\n"
        "image\ttext\t3\t9\tFind a caption that describes the given image.\t\n"
        "image,text\timage,text\t8\t8\tRetrieve the same scene with its words.\t\n")
    return root


# ----------------------------------------------------------------------------------------
# M-BEIR as the stages' data (train.py --mbeir): the same interface as GrainWorld's


def make_mbeir_inputs(args, src: MBeirTrain, step: int) -> Pairs:
    """Stage 2's global batch on M-BEIR: B queries, a positive of each and an extra candidate
    (from its neg_cand_list, else a random one) in 3 blocks; every in-batch candidate that is
    one of a query's positives is masked."""
    rng = random.Random(f"{args.seed}-mbeir-{step}")
    qi = [rng.randrange(len(src.queries)) for _ in range(args.batch_size)]
    pos = [rng.choice(src.positives[i]) for i in qi]
    extra = []
    for i in qi:
        if src.negatives[i]:
            extra.append(rng.choice(src.negatives[i]))
        else:
            j = rng.randrange(len(src.pool.items))
            extra.append(j if j not in src.positives[i] else (j + 1) % len(src.pool.items))
    B = len(qi)
    drop = [rng.random() < args.summary_dropout for _ in range(3 * B)]
    items = [src.queries[i].item for i in qi] + [src.pool.items[j] for j in pos + extra]
    instructions = [src.queries[i].instruction for i in qi] + [None] * (2 * B)
    false_neg = torch.tensor([[c != k and j in src.positives[i] for c, j in enumerate(pos + extra)]
                              for k, i in enumerate(qi)])                                  # (B, 2B)
    return Pairs(items, instructions, drop, false_neg, blocks=3, n_queries=B)


def mbeir_rl_candidates(args, src: MBeirTrain) -> list:
    """data.grainworld_rl_candidates on M-BEIR: per training task, rl_queries queries and a
    mining pool -- a sample of rl_pool_scenes candidates plus the queries' neg_cand_list entries,
    which are `listed` (mined first)."""
    rng = random.Random(f"{args.seed}-rl-data")
    out = []
    n_pool = len(src.pool.items)
    for task in src.tasks:
        mine = [i for i, q in enumerate(src.queries) if q.task == task]
        mine = rng.sample(mine, min(args.rl_queries, len(mine)))
        sample = set(rng.sample(range(n_pool), min(args.rl_pool_scenes, n_pool)))
        cand = sorted(sample | {j for i in mine for j in src.negatives[i]})
        rel = torch.tensor([[j in src.positives[i] for j in cand] for i in mine])           # (Q, P)
        listed = torch.tensor([[j in src.negatives[i] for j in cand] for i in mine])        # (Q, P)
        out.append(([src.queries[i] for i in mine], [src.pool.items[j] for j in cand], rel,
                    listed))
    return out


def meta_of(args) -> dict:
    """What a checkpoint records of its M-BEIR training data (train.py's --mbeir flags)."""
    return {"mbeir": {"root": args.mbeir, "tasks": args.train_tasks, "split": "train",
                      "pool": args.mbeir_pool, "summary_field": args.summary_field}}


def training_source(meta: dict, args=None) -> Source:
    """M-BEIR as the stages' data: meta = {"root", "tasks", "split", "pool", "summary_field"}, as a
    checkpoint records it. Every record and image is read and checked here, before any work, and
    with the run's args its sizes against the flags: stage 2's batch, stage 3's mining sample."""
    src = read_mbeir_train(meta["root"], meta["tasks"], meta["split"], meta["pool"],
                           meta["summary_field"])
    if args is not None:
        if args.batch_size > len(src.queries):
            raise BadInput(f"--batch_size {args.batch_size}: expected at most the "
                           f"{len(src.queries)} training queries of {src.tasks}")
        n_rl = sum(min(args.rl_queries, sum(q.task == t for q in src.queries)) for t in src.tasks)
        if args.rl_batch > n_rl:
            raise BadInput(f"--rl_batch {args.rl_batch}: expected at most the {n_rl} RL instances "
                           f"of {src.tasks} (--rl_queries {args.rl_queries} a task)")
        sample = min(args.rl_pool_scenes, len(src.pool.items))
        if args.n_hard + args.n_rand >= sample:
            raise BadInput(f"--n_hard + --n_rand {args.n_hard + args.n_rand}: expected fewer "
                           f"than the {sample} candidates each task's mining sample holds "
                           f"(--rl_pool_scenes, the pool)")
    meta = {"root": str(src.root), "tasks": src.tasks, "split": src.split, "pool": src.pool_kind,
            "summary_field": src.summary_field}
    return Source(data=src, meta={"mbeir": meta}, texts=src.texts,
                  contrastive_inputs=make_mbeir_inputs, rl_candidates=mbeir_rl_candidates,
                  describe=f"M-BEIR: {len(src.queries)} training queries of {src.tasks} against "
                           f"a pool of {len(src.pool.items)}")


def eval_tasks(args) -> str | None:
    """The M-BEIR tasks train.py evaluates after training (--eval_tasks, else the training tasks
    that have a test query file), checked before any training. None: no test file for them (the
    evaluation is skipped)."""
    test_tasks = mbeir_tasks(args.mbeir, "test")
    if args.eval_tasks is not None:
        asked = [t.strip() for t in args.eval_tasks.split(",") if t.strip()]
        unknown = [t for t in asked if t not in test_tasks and t != "all"]
        if unknown or not asked:
            raise BadInput(f"--eval_tasks {args.eval_tasks}: unknown task(s) {unknown or asked}; "
                           f"{args.mbeir} has test query files for {test_tasks}")
        return ",".join(asked)
    if args.train_tasks == ["all"]:
        return "all" if test_tasks else None
    return ",".join(t for t in args.train_tasks if t in test_tasks) or None


# ----------------------------------------------------------------------------------------
# Evaluation on real data (python eval.py --mbeir ROOT / --mmeb FILE...): M-BEIR by UniIR's protocol
# and MMEB's rows, streamed: neither the [queries, pool] score matrix nor a dense relevance matrix
# is ever built.


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    instructions = read_mbeir_instructions(root / "instructions" / "query_instructions.tsv")
    known = mbeir_tasks(root, split)
    tasks = known if tasks == ["all"] else tasks
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise BadInput(f"--tasks {','.join(tasks)}: unknown task(s) {unknown or tasks}; the "
                       f"M-BEIR folder {root} has query files for {known} (split {split})")
    loaded, pools = [], {}
    rng = random.Random(seed) if instruction == "random" else None
    for task in tasks:
        qpath, ppath = mbeir_paths(root, task, split, pool_kind)
        if ppath not in pools:
            pools[ppath] = read_mbeir_pool(ppath, root)
        qrels_path = root / "qrels" / split / f"mbeir_{task}_{split}_qrels.txt"
        qrels = read_qrels(qrels_path) if qrels_path.is_file() else None
        qs = read_mbeir_queries(qpath, pools[ppath], root, instructions, qrels=qrels,
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
                   seed: int = 0, run_id: str = "elva") -> dict:
    """Per task, UniIR's protocol: Recall@1/5/10 (ties pessimistic), MRR and NDCG@10 over the
    task's local pool or the union pool; a miss (no relevant candidate in the pool) scores 0.
    Every input is checked before any embedding; the TREC run file (qid Q0 did rank score
    run_id) is written whole or not at all."""
    tasks, loaded = read_mbeir_tasks(root, tasks, split, pool_kind, instruction, seed)
    out, run_lines = {}, []
    cache = Path(cache_dir) if cache_dir else None
    for task, qs, pool in loaded:
        t0 = time.time()
        cut = sum(ret.enc.too_long(it, i, ret.model.cfg)
                  for it, i in zip(qs.items, qs.instructions))
        cut += sum(ret.enc.too_long(it, None, ret.model.cfg) for it in pool.items)
        if cut:
            print(f"  {cut} texts of {task} are longer than the model reads: cut to its maximum")
        ep = pool_embeddings(ret, pool, cache, autocast, batch_size)
        eq = ret.embed_items(qs.items, qs.instructions, batch_size, autocast=autocast(),
                             progress=f"{task} queries")[0]
        width = max(1, max(len(p) for p in qs.relevant))
        pos = torch.tensor([p + [-1] * (width - len(p)) for p in qs.relevant])   # (Q, P_max)
        has = pos[:, 0] >= 0                          # the others are misses: in no top K, MRR 0
        ranks = torch.full((len(qs.items),), float("inf"))
        if has.any():
            ranks[has] = ranks_of_best_positive(eq[has.to(eq.device)], ep, pos[has]).float()
        # NDCG's and the run file's ranked list: the reward's rule (NaN last, a positive after ties)
        scores, top = ranked_top_k(eq, ep, max(10, run_depth), positives=pos.to(eq.device))
        out[task] = {**recall_mrr(ranks), "NDCG@10": ndcg_at_k(top.cpu(), qs.relevant),
                     "queries": len(qs.items), "misses": qs.missed, "pool": len(pool.items),
                     "pool_file": pool.path.name, "nonfinite": n_nonfinite(eq, ep),
                     "seconds": time.time() - t0}
        for qid, row, srow in zip(qs.qids, top[:, :run_depth].tolist(),
                                  scores[:, :run_depth].tolist()):
            run_lines += [f"{qid} Q0 {pool.dids[j]} {r} {s:.6f} {run_id}"
                          for r, (j, s) in enumerate(zip(row, srow), 1)]
    keys = ("R@1", "R@5", "R@10", "MRR", "NDCG@10")
    out["avg"] = {**{k: sum(out[t][k] for t in tasks) / len(tasks) for k in keys},
                  "M-BEIR score": mbeir_score(out, tasks)}
    if run_file:
        atomic_write(Path(run_file), lambda p: p.write_text("\n".join(run_lines) + "\n"))
    return out


def evaluate_mmeb(ret, paths: list[str], image_root: str, autocast, batch_size: int = 256):
    """MMEB (VLM2Vec) rows: each ranks its own targets, the first the positive. Per file (keyed
    by its path): Precision@1 (VLM2Vec's metric; ties pessimistic), MRR, chance (mean 1 /
    targets). From the released parquet files, write one JSON row each with read_mmeb's fields."""
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise BadInput(f"--mmeb: {twice} given twice; expected each file once")
    loaded = [(p, read_mmeb(p, image_root)) for p in paths]
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--sample":
        raise BadInput("usage: python mbeir.py --sample DIR (writes a small M-BEIR-format folder "
                       "into a new or empty DIR)")
    print(f"wrote an M-BEIR-format sample to {write_mbeir_sample(argv[1])}")


if __name__ == "__main__":
    from runtime import one_line_errors
    one_line_errors(main)
