"""
Training, the paper's three stages: stage 1, language-only InfoNCE on NLI-style caption triplets (ELVA Section 3.3);
stage 2, the contrastive stage (InfoNCE on generated-embedding [RET] states, Section 3.3); stage 3, ELVA (GRPO with
the paper's margin and ranking rewards over balanced negatives, KL to the stage-2 model, Section 3.4).

    python train.py                       # default preset (gpu on CUDA, else cpu): text -> contrastive -> ELVA -> eval
    python train.py --preset smoke        # the whole pipeline in about a minute on 2 CPU cores
    python train.py --stages elva --rl_objective contrastive --elva_name control   # the equal-compute control
    python train.py --mbeir ROOT --train_tasks mscoco_task0   # both stages on M-BEIR (data.py --mbeir_sample DIR)
    python train.py --help                # every flag, grouped
    torchrun --nproc_per_node=N train.py  # the same, data-parallel over N processes (GPUs, or CPU with gloo)

Outputs under --out (default runs/<preset>): run.json (the arguments that shape the run), tokenizer.json, one
checkpoint folder per stage (model-<step>.safetensors, optimizer-<step>.safetensors for --resume, tokenizer.json and
config.json, which names them with their hashes and is written last), log.jsonl per stage, and eval.json from the
final `python eval.py` run.

The paper's stage 1 (language-only NLI pretraining) is the `text` stage: NLI-style triplets made from GrainWorld
captions (text_stage). `--stages contrastive,elva` leaves it out (the decoder then learns its language in stage 2),
as does --mbeir (its triplets are GrainWorld's).

File order: arguments -> set-up (threads, run folder, logging, the optimizer step) -> stages 1-2 -> stage 3 as the paper
describes it (mining, rollout, the GRPO step) -> beyond the paper (our labelled variants and the equal-compute
control) -> main.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import elva
from data import INSTRUCTIONS, TASKS, GrainWorld, WorldConfig
from kernels import cosine_scores
from reward import DEFAULT_DELTA, RewardConfig, group_advantages, grpo_loss, sequence_credit

# ----------------------------------------------------------------------------------------------------------------------
# Presets: sizes of the world and of each stage. The model sizes live in elva.PRESETS.

TRAIN_PRESETS = {
    "smoke": dict(n_train=400, n_test=60, text_steps=10, steps=40, batch_size=16, lr=2e-3, rl_steps=6, rl_batch=2, group_size=4,
                  n_hard=2, n_rand=2, rl_queries=8, rl_pool_scenes=40, eval_queries=20, mrbench_per_task=6,
                  log_every=5),
    "cpu": dict(n_train=6000, n_test=500, text_steps=300, steps=1000, batch_size=48, lr=1e-3, rl_steps=150, rl_batch=2,
                group_size=8, n_hard=4, n_rand=4, rl_queries=200, rl_pool_scenes=300, eval_queries=200,
                mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, text_steps=1000, steps=6000, batch_size=128, lr=5e-4, rl_steps=400, rl_batch=8,
                group_size=8, n_hard=16, n_rand=16, rl_queries=1000, rl_pool_scenes=1500, eval_queries=250,
                mrbench_per_task=250, log_every=50),
}
# The arguments that decide the world, the tokenizer and the model's shape: a run folder keeps one value of each.
SHAPING_ARGS = ("preset", "seed", "n_train", "n_test", "vocab_size", "mbeir", "train_tasks", "mbeir_split",
                "mbeir_pool", "summary_field")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=None, choices=list(TRAIN_PRESETS), help="sizes; default gpu on CUDA, else cpu")
    g.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    g.add_argument("--seed", type=int, default=0, help="seed for the world, the model and the sampling")
    g.add_argument("--stages", default=None, help="comma list of stages to run: text (the paper's stage 1, "
                   "language-only NLI pretraining), contrastive, elva (default all three; contrastive,elva with "
                   "--mbeir)")
    g.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="reuse an --out folder made with other world / "
                   "tokenizer arguments, starting it afresh (without it such a folder is refused)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the cores this "
                   "process may use; with other jobs on the machine give each job its own cores)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader processes that render and tokenise the "
                   "next batches of every stage while the device trains (default: 0 on a CPU, whose cores do the "
                   "training; up to 4 beside a GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile every transformer block (dynamic shapes): "
                   "faster steps on a GPU after a compile of a minute or so; off by default")
    g.add_argument("--log_every", type=int, default=None, help="steps between log lines")
    g.add_argument("--ckpt_every", type=int, default=250, help="steps between checkpoints")
    g.add_argument("--no_eval", action="store_true", help="skip the final evaluation table")
    g.add_argument("--profile", action="store_true", help="print where a step's time goes (ms per phase over steps "
                   "1-10 of each stage: data, forward, backward, optimizer; in stage 3 also generate, score, "
                   "reference), then go on training")
    g = p.add_argument_group("real data: M-BEIR in UniIR's layout instead of GrainWorld (python data.py "
                             "--mbeir_sample DIR writes a sample)")
    g.add_argument("--mbeir", default=None, help="the M-BEIR root: both stages train on its queries and pool, the "
                   "tokenizer on its text, and the evaluation is eval.py --mbeir on its test split")
    g.add_argument("--train_tasks", default="all", help="comma list of training tasks (e.g. mscoco_task0,"
                   "visualnews_task0) or all: those with a query file under query/<--mbeir_split>/")
    g.add_argument("--mbeir_split", default="train", help="the query split to train on")
    g.add_argument("--mbeir_pool", default="union", choices=["union", "local"], help="train against the union pool "
                   "of the split, or the training tasks' local pools merged")
    g.add_argument("--summary_field", default=None, help="a record field holding a reference summary (M-BEIR has "
                   "none: summaries are then empty, and the next-token loss only teaches [RET])")
    g.add_argument("--eval_tasks", default=None, help="tasks of the final evaluation on the test split (default: "
                   "the training tasks that have a test query file)")
    g = p.add_argument_group("world (GrainWorld)")
    g.add_argument("--n_train", type=int, default=None, help="training scenes")
    g.add_argument("--n_test", type=int, default=None, help="test scenes (= the standard test pool size)")
    g.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    g = p.add_argument_group("stage 1: text (language-only InfoNCE on NLI-style caption triplets)")
    g.add_argument("--text_steps", type=int, default=None, help="optimizer steps of the text stage (batch, lr, tau "
                   "and dropout as stage 2's)")
    g = p.add_argument_group("stage 2: contrastive (InfoNCE + next-token loss on reference summaries)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=None, help="queries per step (each with its positive)")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    g.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    g.add_argument("--lm_weight", type=float, default=1.0, help="weight of the next-token loss on summaries")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--summary_dropout", type=float, default=0.5, help="fraction of items embedded with an empty "
                   "summary in InfoNCE (ours; see contrastive_stage)")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    g = p.add_argument_group("stage 2, beyond the paper (ours; each off by default)")
    g.add_argument("--summary_dropout_end", type=float, default=None, help="anneal summary dropout linearly from "
                   "--summary_dropout to this value over stage 2's steps (default: constant)")
    g.add_argument("--own_summaries", type=float, default=0.0, help="fraction of the items that keep a summary whose "
                   "summary is the model's own greedy one (no LM loss on it) instead of the reference")
    g.add_argument("--own_from", type=float, default=0.5, help="fraction of stage 2's steps after which "
                   "--own_summaries starts")
    g = p.add_argument_group("stage 3: ELVA (GRPO with rule-based ranking rewards)")
    g.add_argument("--elva_name", default="elva", help="checkpoint folder name of this run (e.g. control, no_margin)")
    g.add_argument("--init", default=None, help="start checkpoint (default <out>/contrastive: the stage-2 model)")
    g.add_argument("--rl_steps", type=int, default=None, help="optimizer steps of the ELVA stage")
    g.add_argument("--rl_batch", type=int, default=None, help="queries per step")
    g.add_argument("--group_size", type=int, default=None, help="G: rollouts per query (paper 8)")
    g.add_argument("--n_hard", type=int, default=None, help="filtered hard negatives per query (paper 50)")
    g.add_argument("--n_rand", type=int, default=None, help="random negatives per query (paper 50)")
    g.add_argument("--hard_threshold", type=float, default=0.95,
                   help="drop candidates above this stage-2 cosine from the hard negatives (likely false negatives)")
    g.add_argument("--rl_queries", type=int, default=None, help="RL instances per task (queries with mined sets)")
    g.add_argument("--rl_pool_scenes", type=int, default=None, help="train scenes in each task's mining pool (plus "
                   "their one-grain siblings)")
    g.add_argument("--rl_lr", type=float, default=1e-5, help="AdamW learning rate (paper 1e-6 for 7B + LoRA)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollout summaries")
    g.add_argument("--clip_eps", type=float, default=0.2, help="PPO clip epsilon")
    g.add_argument("--beta", type=float, default=0.2, help="KL coefficient to the reference model (paper 0.2)")
    g.add_argument("--num_iterations", type=int, default=1, help="updates per rollout batch (1: on-policy, ratio 1)")
    g.add_argument("--alpha", type=float, default=0.4, help="weight of R_Margin (paper 0.4; 0 ablates it)")
    g.add_argument("--epsilon", type=float, default=0.6, help="weight of R_Rank (paper 0.6; 0 ablates it)")
    g.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="margin of R_Margin (paper: not given)")
    g.add_argument("--gamma", default="auto", help="weight of R_Rank's negative term: 'auto' (1 / sum_k (ln k - 1) "
                   "over the candidate count, reward.auto_gamma) or a number (0 ablates the term; paper: not given)")
    g.add_argument("--train_vision", action="store_true", help="also train the vision tower and projector in stage 3 "
                   "(the paper freezes the vision encoder)")
    g = p.add_argument_group("stage 3, beyond the paper (ours; each off by default)")
    g.add_argument("--rl_objective", default="grpo", choices=["grpo", "contrastive"],
                   help="grpo: the paper's ELVA; contrastive: the equal-compute control (stage 2's loss on the same "
                        "candidate sets, same steps and queries)")
    g.add_argument("--reward", default="paper", choices=["paper", "toy", "length"],
                   help="paper: R_total; toy: the fraction of colour words in the rollout's summaries; length: minus "
                        "the rollout's mean summary length in tokens (targets known to be learnable: they check GRPO)")
    g.add_argument("--credit", default="rollout", choices=["rollout", "sequence"],
                   help="rollout: the paper's, every summary of a rollout shares its reward; sequence: each summary "
                        "credited for its own part of the ranking (reward.sequence_credit)")
    g.add_argument("--pathwise", type=float, default=0.0, help="weight of -R_total used as a differentiable loss "
                   "through the embeddings, added to GRPO's (0: the paper's method)")
    g.add_argument("--sample", default="all", choices=["all", "query"],
                   help="all: the paper's, every summary of a rollout is sampled; query: only the query's, the "
                        "candidates keep their greedy summaries (not trained), so a group's rewards differ by the "
                        "query's words alone")
    g.add_argument("--anchor", type=float, default=0.0, help="weight of an embedding anchor: the mean cosine distance "
                   "between the policy's and the stage-2 model's [RET] embeddings of the same sampled (input, "
                   "summary) pairs, so that GRPO changes the words while the map from words to embeddings stays "
                   "(0: the paper's method)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_queries", type=int, default=None, help="standard-split queries per task")
    g.add_argument("--mrbench_per_task", type=int, default=None, help="MRBench-mini queries per task")
    return resolve_args(p.parse_args(argv))


def _fail(flag: str, value, expected: str):
    raise SystemExit(f"{flag} {value!r}: expected {expected}")


def resolve_args(args):
    """Fill preset values, then check every flag's range before any work: one line naming the flag and the value."""
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    if args.preset not in TRAIN_PRESETS:
        _fail("--preset", args.preset, f"one of {list(TRAIN_PRESETS)}")
    for k, v in TRAIN_PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"runs/{args.preset}"
    if args.stages is None:
        args.stages = "contrastive,elva" if args.mbeir else "text,contrastive,elva"
    if isinstance(args.stages, str):
        args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in ("text", "contrastive", "elva")]
    if bad or not args.stages:
        _fail("--stages", ",".join(args.stages), "a comma list of text, contrastive and/or elva")
    if "text" in args.stages and "contrastive" not in args.stages:
        _fail("--stages", ",".join(args.stages), "text together with contrastive (stage 2 starts from stage 1)")
    if args.mbeir is not None:
        if not (Path(args.mbeir) / "query" / args.mbeir_split).is_dir():
            _fail("--mbeir", args.mbeir, f"an M-BEIR root holding query/{args.mbeir_split}/ (and cand_pool/, "
                                         f"instructions/)")
        if "text" in args.stages:
            _fail("--stages", ",".join(args.stages), "contrastive and/or elva with --mbeir (the text stage's NLI "
                                                     "triplets are made from GrainWorld captions)")
    args.train_tasks = [t.strip() for t in args.train_tasks.split(",") if t.strip()] \
        if isinstance(args.train_tasks, str) else args.train_tasks
    if isinstance(args.gamma, str):
        if args.gamma == "auto":
            args.gamma = None
        else:
            try:
                args.gamma = float(args.gamma)
            except ValueError:
                _fail("--gamma", args.gamma, "'auto' or a number")
    positive_ints = ("steps", "text_steps", "rl_steps", "ckpt_every", "log_every", "rl_batch", "rl_queries", "rl_pool_scenes",
                     "num_iterations", "eval_queries", "mrbench_per_task", "n_train", "n_test")
    for k in positive_ints:
        if getattr(args, k) < 1:
            _fail(f"--{k}", getattr(args, k), "an integer >= 1")
    for k in ("n_hard", "n_rand"):
        if getattr(args, k) < 0:
            _fail(f"--{k}", getattr(args, k), "an integer >= 0")
    if args.n_hard + args.n_rand < 1:
        _fail("--n_hard + --n_rand", args.n_hard + args.n_rand, ">= 1: a ranking needs a negative")
    if args.batch_size < 2:
        _fail("--batch_size", args.batch_size, ">= 2: with one query InfoNCE has no negative and learns nothing")
    if args.rl_batch > len(TASKS) * args.rl_queries:
        _fail("--rl_batch", args.rl_batch, f"<= the RL instances ({len(TASKS)} tasks x --rl_queries "
                                          f"{args.rl_queries} = {len(TASKS) * args.rl_queries})")
    if args.group_size < 2 and args.rl_objective == "grpo":
        _fail("--group_size", args.group_size, ">= 2 for GRPO: advantages need a group")
    for k in ("lr", "rl_lr", "temperature"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v > 0):
            _fail(f"--{k}", v, "a finite number > 0")
    if not (math.isfinite(args.tau) and 0.005 <= args.tau <= 10):
        _fail("--tau", args.tau, "a temperature in [0.005, 10] (smaller overflows the logits)")
    for k in ("beta", "alpha", "epsilon", "delta", "weight_decay", "lm_weight", "pathwise", "anchor"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v >= 0):
            _fail(f"--{k}", v, "a finite number >= 0")
    if args.gamma is not None and not (math.isfinite(args.gamma) and args.gamma >= 0):
        _fail("--gamma", args.gamma, "'auto' or a finite number >= 0")
    for k, lo, hi in (("summary_dropout", 0, 1), ("summary_dropout_end", 0, 1), ("own_summaries", 0, 1),
                      ("own_from", 0, 1), ("warmup", 0, 1), ("clip_eps", 1e-6, 1), ("hard_threshold", -1, 1)):
        v = getattr(args, k)
        if v is not None and not lo <= v <= hi:
            _fail(f"--{k}", v, f"a number in [{lo}, {hi}]")
    if args.vocab_size < 300:
        _fail("--vocab_size", args.vocab_size, ">= 300 (256 byte symbols, 5 special tokens and some merges)")
    if args.threads is not None and args.threads < 1:
        _fail("--threads", args.threads, "an integer >= 1")
    if args.workers is not None and args.workers < 0:
        _fail("--workers", args.workers, "an integer >= 0")
    if args.device not in ("auto", "cpu", "cuda", "mps") and not args.device.startswith("cuda:"):
        _fail("--device", args.device, "auto, cpu, cuda, cuda:N or mps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device", args.device, "a device this machine has: torch sees no CUDA GPU here (try --device cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        _fail("--device", args.device, "a device this machine has: MPS is not available here")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        _fail("--out", args.out, "a folder (this path is a file)")
    args.reward_cfg = RewardConfig(args.alpha, args.epsilon, args.delta, args.gamma)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Set-up shared by the stages: threads, the run folder, the tokenizer, the schedule, logging, the optimizer step


def set_threads(args) -> int:
    """Torch's CPU threads: --threads, else the cores this process may use (elva.default_threads)."""
    n = args.threads or elva.default_threads()
    torch.set_num_threads(n)
    return n


def check_run_folder(args):
    """A run folder belongs to one world, tokenizer and model shape (run.json), which the contrastive stage makes.
    Refuse to mix: a saved tokenizer would silently override --vocab_size, another --seed would train on another
    world. (An ELVA-only run takes its world and tokenizer from --init: its --seed varies only the RL sampling.)"""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _fail("--out", args.out, f"a folder this process can write ({e.strerror})")
    if "contrastive" not in args.stages:
        return
    shaping = {k: getattr(args, k) for k in SHAPING_ARGS}
    path = out / "run.json"
    if path.exists() and not args.overwrite:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for k, v in shaping.items():
            if k in old and old[k] != v:
                raise SystemExit(f"--{k} {v!r}: the folder {out} holds a run made with --{k} {old[k]!r}; use another "
                                 f"--out, the same --{k}, or --overwrite to start that folder afresh")
    elif args.overwrite:
        for stale in ("tokenizer.json", "eval.json"):
            (out / stale).unlink(missing_ok=True)
    elva._atomic_write(path, lambda p: p.write_text(json.dumps(shaping, indent=2)))


def world_config(args) -> WorldConfig:
    return WorldConfig(seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                       image_size=elva.PRESETS[args.preset].image_size)


def build_tokenizer(args, source):
    """The run's BPE tokenizer, trained once on the source's text (GrainWorld's captions, or the M-BEIR data's)."""
    path = Path(args.out) / "tokenizer.json"
    if path.exists():   # check_run_folder made sure it was trained with these arguments
        return data.load_tokenizer(path)
    lines = source.texts() if isinstance(source, data.MBeirTrain) else data.world_corpus(source, seed=args.seed)
    tok = data.train_tokenizer(lines, args.vocab_size)
    elva._atomic_write(path, lambda p: tok.save(str(p)))
    return tok


def read_source(args, meta: dict | None = None):
    """The training data: GrainWorld (built from --seed and the preset, or a checkpoint's 'world' section), or
    M-BEIR (--mbeir, or a checkpoint's 'mbeir' section), read and checked whole before any work."""
    if meta is not None:
        m = meta.get("mbeir")
    elif args.mbeir:
        m = {"root": args.mbeir, "tasks": args.train_tasks, "split": args.mbeir_split, "pool": args.mbeir_pool,
             "summary_field": args.summary_field}
    else:
        m = None
    if m:
        try:
            return data.read_mbeir_train(m["root"], m["tasks"], m["split"], m["pool"], m["summary_field"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"--mbeir {m['root']}: {e}") from None
    return GrainWorld(WorldConfig(**meta["world"]) if meta else world_config(args))


def source_meta(source) -> dict:
    """What a checkpoint records of its training data, so that the next stage and eval.py can rebuild it."""
    if isinstance(source, data.MBeirTrain):
        return {"mbeir": {"root": str(source.root), "tasks": source.tasks, "split": source.split,
                          "pool": source.pool_kind, "summary_field": source.summary_field}}
    return {"world": source.cfg.__dict__}


def compile_blocks(model, args):
    """--compile: torch.compile each transformer block (ViT and decoder) in place, so parameter names and checkpoints
    stay as they are; shapes are marked dynamic because prompt and summary lengths change from batch to batch."""
    if args.compile:
        for blk in [*model.vit, *model.blocks]:
            blk.compile(dynamic=True)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Logger:
    """One plain line per log step and a JSONL record per step. A fresh run starts a fresh log; a resumed one keeps
    only the records up to the checkpoint it resumed from, so a log never holds a step twice."""

    def __init__(self, folder: Path, stage: str, total: int, start: int, every: int, writer: bool = True):
        self.writer = writer   # under torchrun only the first process writes and prints
        self.stage, self.total, self.start, self.every = stage, total, start, every
        self.t0 = time.time()
        self.buffer = []       # records not yet read from the device (log with lazy=True)
        if not writer:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "log.jsonl"
        kept = []
        if start > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start]
        elva._atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        self.f = open(path, "a")

    def log(self, step: int, rec: dict, args=None, lazy: bool = False):
        """Record step `step`. Values may be 0-d tensors: with lazy (on a GPU), records wait in a buffer and are
        read from the device together at the next print step (one synchronisation per log line, not per step);
        otherwise at once. Under torchrun every process calls this; the values are averaged over processes."""
        self.buffer.append((step, time.time(), rec))
        if lazy and not (step % self.every == 0 or step == self.total - 1):
            return
        buffered, self.buffer = self.buffer, []
        # every tensor value of the buffered records, read from the device at once
        tensors = [v.detach().float().reshape(()) for _, _, r in buffered for v in r.values()
                   if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        for step_i, t, r in buffered:
            vals = {k: next(read) if isinstance(v, torch.Tensor) else v for k, v in r.items()}
            self._write(step_i, t, averaged(vals, args))

    def _write(self, step: int, now: float, rec: dict):
        if not self.writer:
            return
        elapsed = now - self.t0
        done = step + 1 - self.start
        ms = 1000 * elapsed / max(1, done)
        rec = {"stage": self.stage, "step": step, "ms_per_step": round(ms, 1), **rec}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if step % self.every == 0 or step == self.total - 1:
            eta = (self.total - step - 1) * ms / 1000
            parts = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                               if k not in ("stage", "step", "ms_per_step"))
            print(f"{self.stage} {step:05d}/{self.total} | {parts} | {ms:.0f} ms/step | eta {eta / 60:.1f} min",
                  flush=True)


def phase(name: str):
    """Label a phase of a step for --profile (torch.profiler.record_function: next to free when not profiling)."""
    return torch.profiler.record_function(f"phase/{name}")


class Profiler:
    """--profile: runs torch.profiler over steps first..first+n-1 of a stage, then prints the mean milliseconds per
    step of each phase() label and of the whole step (wall clock). On CUDA the table also shows the GPU's time per
    phase, so a reader sees whether the GPU waits on the host."""

    def __init__(self, enabled: bool, stage: str, start: int, total: int, n: int = 10):
        self.enabled, self.stage = enabled, stage
        self.first = min(start + 1, total - 1)                 # step `start` warms up (allocations, caches)
        self.last = min(self.first + n, total) - 1
        self.prof, self.t0 = None, 0.0

    def step_begins(self, step: int):
        if self.enabled and step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
            self.t0 = time.perf_counter()

    def step_ends(self, step: int):
        if self.prof is None or step != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - self.t0) * 1000
        self.prof.stop()
        n = self.last - self.first + 1
        rows = [(e.key[len("phase/"):], e.cpu_time_total / 1000 / n, getattr(e, "device_time_total", 0) / 1000 / n)
                for e in self.prof.key_averages() if e.key.startswith("phase/")]
        print(f"{self.stage} profile, steps {self.first}-{self.last} (ms per step; host time includes the host's "
              f"waits on the GPU):")
        print(f"| phase | host ms | GPU ms |\n|---|---|---|")
        for name, host, dev in sorted(rows, key=lambda r: -r[1]):
            print(f"| {name} | {host:.1f} | {dev:.1f} |")
        print(f"| whole step (wall) | {wall / n:.1f} | |", flush=True)
        self.prof = None


# ----------------------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun). Every process builds the same global batch from the same per-step seed and takes its
# share; gradients are averaged over the processes before the optimizer step, so the processes keep identical
# weights. This is what DistributedDataParallel does, written out: our model is driven through several methods
# (generate, token_logprobs, shared_prefix_logprobs), not one forward() that DDP could wrap. Without torchrun every
# helper here is the identity.


def init_distributed(args):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (NCCL), or per CPU share (gloo)."""
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return
    for name, n in (("--batch_size", args.batch_size), ("--rl_batch", args.rl_batch)):
        if n % args.world_size:
            _fail(name, n, f"a multiple of the {args.world_size} processes (each takes an equal share)")
    if args.rank > 0:   # one voice: only the first process prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    nccl = torch.cuda.is_available() and not args.device.startswith("cpu")
    dist.init_process_group("nccl" if nccl else "gloo")
    if nccl:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"


def world_of(args) -> int:
    return getattr(args, "world_size", 1) if args is not None else 1


def rank_of(args) -> int:
    return getattr(args, "rank", 0) if args is not None else 0


def barrier(args):
    if world_of(args) > 1:
        dist.barrier()


def my_share(xs, args, rank: int | None = None):
    """This process's contiguous share of a global batch (a list or a tensor's rows)."""
    n = len(xs) // world_of(args)
    r = rank_of(args) if rank is None else rank
    return xs[r * n:(r + 1) * n]


def my_share_of_items(flags: list, args, blocks: int) -> list:
    """Per-item flags of a global batch laid out as `blocks` equal blocks ([queries, positives, ...]) -> the flags
    of this process's items, laid out the same way."""
    n = len(flags) // blocks
    return [f for k in range(blocks) for f in my_share(flags[k * n:(k + 1) * n], args)]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every process the gradient of the summed losses w.r.t. its own rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                                  # every process's loss depends on every row
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather(x: torch.Tensor, args) -> torch.Tensor:
    return x if world_of(args) == 1 else _GatherWithGrad.apply(x)


def average_gradients(model, args):
    """Average every trainable parameter's gradient over the processes, in one flat all_reduce."""
    if world_of(args) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]   # a share without images
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_of(args)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g


def averaged(rec: dict, args) -> dict:
    """A log record's numbers averaged over the processes (the global batch's values)."""
    if world_of(args) == 1:
        return rec
    keys = [k for k, v in rec.items() if isinstance(v, (int, float))]
    v = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(v)
    return {**rec, **{k: x / world_of(args) for k, x in zip(keys, v.tolist())}}


def last_good(folder: Path) -> str:
    """What a stop leaves behind, for the error message."""
    try:
        return f"the last checkpoint in {folder} (step {elva.read_manifest(folder)['step']}) is kept"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint of this stage was written to {folder}"


def optimizer_step(opt: torch.optim.Optimizer, model, loss: torch.Tensor, step: int, stage: str,
                   folder: Path, args=None) -> torch.Tensor:
    """Check the loss and the gradient are finite, backward, average the gradients over processes (torchrun), clip
    the gradient norm to 1, step. A non-finite loss or gradient stops the run before the update is applied (and so
    before anything is saved). -> pre-clip grad norm.

    With a fused AdamW (on CUDA) the check costs no host synchronisation: the optimizer is told on the device
    (found_inf, the mechanism of torch's GradScaler) to skip an update whose loss or gradient is not finite, and
    the host reads the verdicts at the next log step or checkpoint (check_updates), where the run stops."""
    fused = opt.defaults.get("fused")
    if not fused and not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} step {step}: the loss is {loss.item()}; stopping before applying it; "
                                 f"{last_good(folder)}")
    opt.zero_grad(set_to_none=True)
    with phase("backward"):
        loss.backward()
        average_gradients(model, args)
    with phase("optimizer"):
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if fused:   # the check on the device: found_inf = 1 skips the update; check_updates reads it later
            opt.found_inf = (~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))).float()
            opt.step()
            opt.found_inf = None
            opt.pending = getattr(opt, "pending", []) + [(step, loss.detach(), gnorm.detach())]
        elif not torch.isfinite(gnorm):
            raise FloatingPointError(f"{stage} step {step}: the gradient norm is {gnorm.item()}; stopping before "
                                     f"applying it; {last_good(folder)}")
        else:
            opt.step()
    return gnorm


def check_updates(opt: torch.optim.Optimizer, stage: str, folder: Path):
    """Read the verdicts of the updates a fused optimizer checked on the device (optimizer_step), in one
    synchronisation: stop at the first step whose loss or gradient was not finite (its update was not applied)."""
    pending, opt.pending = getattr(opt, "pending", []), []
    if not pending:
        return
    values = torch.stack([torch.stack([l.float(), g.float()]) for _, l, g in pending]).tolist()
    for (step, _, _), (loss, gnorm) in zip(pending, values):
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
            raise FloatingPointError(f"{stage} step {step}: {what}; its update was not applied; stopping; "
                                     f"{last_good(folder)}")


def save(folder: Path, model, tok, meta: dict, opt, step: int, stage: str, args=None):
    """A checkpoint of the stage (weights + optimizer state, written as a unit) -- never of non-finite weights."""
    check_updates(opt, stage, folder)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"{stage} step {step}: the weights became non-finite ({bad[0]}"
                                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saving them; "
                                 f"{last_good(folder)}")
    if rank_of(args) == 0:   # one writer: every process holds the same weights
        elva.save_checkpoint(folder, model, tok, {**meta, "step": step}, optimizer=opt)
    barrier(args)


def resume_point(args, folder: Path, model, opt, stage: str, device) -> int:
    """With --resume and a checkpoint in `folder`: load its weights and optimizer state (hashes verified) into model
    and opt. -> the first step still to run (0 when starting afresh)."""
    if not (args.resume and (folder / "config.json").exists()):
        return 0
    saved, _, meta = elva.load_checkpoint(folder, device)
    model.load_state_dict(saved.state_dict())
    if not elva.load_optimizer(folder, opt, model, meta):
        print(f"{stage}: warning: {folder} holds no optimizer state; resuming with a fresh AdamW")
    print(f"{stage}: resumed from {folder} at step {meta['step'] + 1} (weights, optimizer state and tokenizer "
          f"verified against config.json)")
    return meta["step"] + 1


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: contrastive (ELVA Section 3.3). InfoNCE on [RET] embeddings with teacher-forced reference summaries, plus
# the next-token loss that teaches our from-scratch model to write summaries at all (Qwen2-VL already can).


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg: torch.Tensor | None = None,
             target_offset: int = 0):
    """L = -1/N sum_n log( exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau) )   (ELVA, Section 3.3).

    eq (N, D), ec (N, M, D) or (M, D) unit vectors. With ec (M, D), candidate n is query n's positive (in-batch
    negatives); with ec (N, M, D), candidate 0 of each row is its positive. false_neg (N, M) bool masks candidates
    known to be relevant (GrainWorld knows them), so that a true match is never pushed away as a negative.
    target_offset: with candidates gathered from several processes, query n's positive is column offset + n."""
    if ec.dim() == 2:
        logits = eq @ ec.T / tau                                               # (N, M)
        target = torch.arange(eq.shape[0], device=eq.device) + target_offset
    else:
        logits = torch.einsum("nd,nmd->nm", eq, ec) / tau                      # (N, M)
        target = torch.zeros(eq.shape[0], dtype=torch.long, device=eq.device)
    if false_neg is not None:
        logits = logits.masked_fill(false_neg, float("-inf"))
    return F.cross_entropy(logits.float(), target)


def in_batch_false_negatives(queries) -> torch.Tensor:
    """(B, B) bool: candidate j (query j's positive) is relevant to query i, whatever task query j came from.
    Candidates are embedded without an instruction, so an image->image positive that satisfies a text->image caption
    is a true match for that caption: it must not be pushed away as a negative."""
    B = len(queries)
    m = torch.zeros(B, B, dtype=torch.bool)
    for i, qi in enumerate(queries):
        for j, qj in enumerate(queries):
            if i != j and data.relevant(qi.task, qi.item, qj.positive):
                m[i, j] = True
    return m


def reference_summaries(enc, items, drop: list[bool]) -> list[list[int]]:
    """Each item's reference summary ids, or none where summary dropout drops it."""
    return [[] if d else enc.summary(it.summary) for it, d in zip(items, drop)]


def teacher_forced(retriever, items, instructions, autocast, drop: list[bool] | None = None):
    """Reference summaries, teacher-forced: -> (embeddings (N, D), summary-token log-probs (N, T), LM mask (N, T)).

    drop[i] = True replaces item i's summary by an empty one ([RET] right after the prompt) and takes the row out of
    the LM loss (summary dropout, ours: see stage2_loss)."""
    drop = drop or [False] * len(items)
    with phase("data"):   # render the images, tokenise, collate
        b, imgs = retriever.batch(items, instructions, reference_summaries(retriever.enc, items, drop))
    return teacher_forced_on(retriever.model, b, imgs, torch.tensor(drop), autocast)


def teacher_forced_on(model, b: dict, imgs: torch.Tensor, drop: torch.Tensor, autocast):
    """teacher_forced on an encoded batch (tensors on the model's device; drop (N,) bool)."""
    with phase("forward"), autocast():
        logp, h = model.token_logprobs(b, imgs)
    lm_mask = b["gen_mask"] & ~drop.to(logp.device)[:, None]
    return model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def stage2_loss(args, retriever, items, instr, drop: list[bool], autocast, group: int | None = None,
                false_neg: torch.Tensor | None = None, n_queries: int | None = None, encoded=None):
    """Stage 2's loss: InfoNCE + lm_weight * next-token loss, with summary dropout (`drop`, one flag per item). Items
    are laid out either as [B queries, then the candidates: their B positives first, then any extra negatives]
    (group None: in-batch negatives, stages 1 and 2; n_queries = B, default half the items) or as rows of `group`
    items [query, positive, negatives...] (the equal-compute control). -> (loss, InfoNCE, LM loss).

    Summary dropout (ours): with teacher-forced reference summaries, a query and its positive often carry
    near-identical summary text (for i2i the very same string), so InfoNCE can be met by reading the summary and
    never teaches the [RET] state to look at the input. Dropping the summary of a random part of the items makes
    InfoNCE train perception directly; the LM loss still teaches every kept summary.

    Under torchrun each process holds its share of the batch: in-batch candidates are gathered from every process
    (gradients flow back to their owners), and the LM loss is normalised by the global token count, so that the
    mean of the processes' losses is the loss of one process over the whole batch.
    encoded: (batch, images) already made by a DataLoader worker (make_stage2_inputs); items are then unused."""
    if encoded is None:
        e, logp, lm_mask = teacher_forced(retriever, items, instr, autocast, drop)
    else:
        e, logp, lm_mask = teacher_forced_on(retriever.model, *encoded, torch.tensor(drop), autocast)
    if group is None:
        B = n_queries or len(items) // 2
        ec = gather(e[B:], args)                                                # (world * candidates, D)
        l_nce = info_nce(e[:B], ec, args.tau, false_neg, target_offset=rank_of(args) * (e.shape[0] - B))
    else:
        e = e.view(-1, group, e.shape[-1])                                      # (B, K, D)
        l_nce = info_nce(e[:, 0], e[:, 1:], args.tau)
    if world_of(args) > 1:
        n_tok = lm_mask.sum().float()
        dist.all_reduce(n_tok)
        l_lm = -logp.sum() * world_of(args) / n_tok.clamp(min=1)
    else:
        l_lm = -logp.sum() / lm_mask.sum().clamp(min=1)
    return l_nce + args.lm_weight * l_lm, l_nce, l_lm


def make_text_inputs(args, world, enc, limit, step: int) -> dict:
    """Stage 1's step `step` without the model: B (scene, premise, entailed, contradiction) from the step's seed (so
    --resume and any number of workers replay the same batch), this process's share, the dropout flags, the
    false-negative mask (a candidate the query's scene satisfies), and the encoded tensors on the CPU."""
    rng = random.Random(f"{args.seed}-text-{step}")
    scenes, triplets = [], []
    while len(triplets) < args.batch_size:
        s = rng.choice(world.splits["train"])
        t = data.nli_triplet(rng, s)
        if t is not None:
            scenes.append(s)
            triplets.append(t)
    all_triplets = triplets
    # this process's share: B / world triplets; candidates, gathered over the processes, come per process as
    # [its entailed captions, its contradictions]
    scenes, triplets = my_share(scenes, args), my_share(triplets, args)
    drop = my_share_of_items([rng.random() < args.summary_dropout for _ in range(3 * args.batch_size)], args, 3)
    b = len(triplets)
    cols = [c for r in range(world_of(args)) for k in (1, 2) for c in [t[k] for t in my_share(all_triplets, args, r)]]
    caps = [t[0] for t in triplets] + [t[1] for t in triplets] + [t[2] for t in triplets]
    items = [data.Item(text=c.text(), summary=c.summary(), caption=c) for c in caps]
    false_neg = torch.tensor([[j != rank_of(args) * 2 * b + i and data.satisfies(s, c) for j, c in enumerate(cols)]
                              for i, s in enumerate(scenes)])                                 # (b, 2B)
    summaries = reference_summaries(enc, items, drop)
    return {"encoded": data.encode_batch(enc, items, [None] * len(items), summaries, limit), "drop": drop,
            "false_neg": false_neg, "n_queries": b}


def make_stage2_inputs(args, world, enc, limit, step: int) -> dict:
    """Stage 2's step `step` without the model: the global batch of B queries over the four tasks and their
    positives from the step's seed, this process's share, the dropout flags, the false-negative mask (the candidates
    of InfoNCE are every process's positives, so it has a row per local query) and the encoded tensors (CPU)."""
    rng = random.Random(f"{args.seed}-contrastive-{step}")
    queries = world.sample_queries(rng, args.batch_size)                       # the global batch
    p_drop = dropout_at(args, step)
    drop = my_share_of_items([rng.random() < p_drop for _ in range(2 * len(queries))], args, 2)
    mine = my_share(queries, args)
    items = [q.item for q in mine] + [q.positive for q in mine]
    instr = [INSTRUCTIONS[q.task] for q in mine] + [None] * len(mine)
    summaries = reference_summaries(enc, items, drop)
    out = {"encoded": data.encode_batch(enc, items, instr, summaries, limit), "drop": drop,
           "false_neg": my_share(in_batch_false_negatives(queries), args), "n_queries": len(mine)}
    if args.own_summaries > 0 and step >= args.own_from * args.steps:   # ours: see own_summaries_step
        own_rng = random.Random(f"{args.seed}-own-{step}")
        own = my_share_of_items([own_rng.random() < args.own_summaries for _ in range(2 * len(queries))], args, 2)
        out.update(own=[o and not d for o, d in zip(own, drop)], items=items, instr=instr)
    return out


def make_mbeir_inputs(args, src: data.MBeirTrain, enc, limit, step: int) -> dict:
    """Stage 2's step on M-BEIR: B queries drawn from the training tasks, for each one positive (any of its
    positives) and one extra candidate -- an entry of its neg_cand_list where the data gives one, else a random pool
    candidate -- laid out like stage 1's triplets: [queries, positives, extras]. The mask takes out every in-batch
    candidate that is one of the query's positives."""
    rng = random.Random(f"{args.seed}-mbeir-{step}")
    qi = [rng.randrange(len(src.queries)) for _ in range(args.batch_size)]    # the global batch
    pos = [rng.choice(src.positives[i]) for i in qi]
    extra = []
    for i in qi:
        if src.negatives[i]:
            extra.append(rng.choice(src.negatives[i]))
        else:
            j = rng.randrange(len(src.pool.items))
            extra.append(j if j not in src.positives[i] else (j + 1) % len(src.pool.items))
    drop = my_share_of_items([rng.random() < dropout_at(args, step) for _ in range(3 * args.batch_size)], args, 3)
    mine, b = my_share(qi, args), len(qi) // world_of(args)
    items = ([src.queries[i].item for i in mine] + [src.pool.items[j] for j in my_share(pos, args)]
             + [src.pool.items[j] for j in my_share(extra, args)])
    instr = [src.queries[i].instruction for i in mine] + [None] * (2 * b)
    cols = [j for r in range(world_of(args)) for j in my_share(pos, args, r) + my_share(extra, args, r)]
    false_neg = torch.tensor([[c != rank_of(args) * 2 * b + k and j in src.positives[i] for c, j in enumerate(cols)]
                              for k, i in enumerate(mine)])                                  # (b, 2B)
    summaries = reference_summaries(enc, items, drop)
    return {"encoded": data.encode_batch(enc, items, instr, summaries, limit), "drop": drop,
            "false_neg": false_neg, "n_queries": b}


def dropout_at(args, step: int) -> float:
    """Stage 2's summary-dropout rate at `step`: constant, or (--summary_dropout_end, ours) annealed linearly."""
    if args.summary_dropout_end is None:
        return args.summary_dropout
    return args.summary_dropout + (args.summary_dropout_end - args.summary_dropout) * step / max(1, args.steps - 1)


class StepStream(torch.utils.data.IterableDataset):
    """The inputs of steps start..stop-1, one per item, made by make(step). With n DataLoader workers, worker w makes
    steps start + w, start + w + n, ...; the DataLoader hands them back round-robin, so in step order."""

    def __init__(self, make, start: int, stop: int):
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.make(step)


def step_inputs(args, make, start: int, stop: int, device):
    """Iterate over the steps' inputs: made in DataLoader workers ahead of the step (--workers), in pinned memory
    beside a GPU, so that rendering and tokenising overlap the device's work; made in place with 0 workers."""
    workers = elva.default_workers(device, args.workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # workers are forked after the tokenizer is made
    return iter(torch.utils.data.DataLoader(StepStream(make, start, stop), batch_size=None, num_workers=workers,
                                            pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None))


def stage_step(args, retriever, inputs, autocast, device):
    """Stages 1-2: the loss of one step from its prepared inputs."""
    if any(inputs.get("own", ())):
        return own_summaries_step(args, retriever, inputs, autocast, device)
    return stage2_loss(args, retriever, None, None, inputs["drop"], autocast, false_neg=inputs["false_neg"].to(device),
                       n_queries=inputs["n_queries"], encoded=retriever.on_device(*inputs["encoded"]))


def own_summaries_step(args, retriever, inputs, autocast, device):
    """Ours (--own_summaries): stage 2 reading its own words. Stage 2 learns its embedding from reference summaries
    but is evaluated (and, in stage 3, rewarded) on the summaries it generates; here the items flagged `own` get the
    model's current greedy summary instead, so InfoNCE also teaches the [RET] state to make use of -- or to discount
    -- the words the model really writes. Those rows stay out of the next-token loss (they are not references)."""
    items, instr, own, drop = inputs["items"], inputs["instr"], inputs["own"], inputs["drop"]
    idx = [i for i, o in enumerate(own) if o]
    with torch.no_grad(), phase("generate"), autocast():
        written = retriever.summarise([items[i] for i in idx], [instr[i] for i in idx])
    summaries = reference_summaries(retriever.enc, items, drop)
    for i, s in zip(idx, written):
        summaries[i] = s
    with phase("data"):
        encoded = retriever.batch(items, instr, summaries)
    no_lm = [d or o for d, o in zip(drop, own)]
    return stage2_loss(args, retriever, None, None, no_lm, autocast, false_neg=inputs["false_neg"].to(device),
                       n_queries=inputs["n_queries"], encoded=encoded)


def text_stage(args, world, tok, device, autocast):
    """The paper's stage 1 (Sec. 3.3, after LamRA) in miniature: language-only InfoNCE on NLI-style triplets. Each
    query is a caption of a training scene; its positive a caption the premise entails, reworded; its hard negative
    the premise with one grain contradicted (data.nli_triplet). In-batch negatives too; a candidate the query's scene
    satisfies is masked. Same model, template, summaries and dropout as stage 2, no images."""
    embedding_stage(args, world, tok, device, autocast, "text", args.text_steps, make_text_inputs, None,
                    "NLI triplets")


def contrastive_stage(args, world, tok, device, autocast):
    """Stage 2 (Sec. 3.3): InfoNCE over in-batch negatives (true matches masked) + the summaries' next-token loss,
    from stage 1's weights when this run has the text stage. `world`: GrainWorld, or M-BEIR's training data."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    make = make_mbeir_inputs if isinstance(world, data.MBeirTrain) else make_stage2_inputs
    embedding_stage(args, world, tok, device, autocast, "contrastive", args.steps, make, init, "queries")


def embedding_stage(args, world, tok, device, autocast, name: str, steps: int, make_inputs, init: Path | None,
                    what: str):
    """The loop of stages 1 and 2: a fresh model (or `init`'s weights), then per step: the batch (made from the
    step's seed by make_inputs, in DataLoader workers when there are any, so --resume replays it) -> stage2_loss ->
    warm-up + cosine learning rate -> clipped AdamW step -> log; a checkpoint every ckpt_every steps and at the end."""
    folder = Path(args.out) / name
    torch.manual_seed(args.seed)
    model = elva.build_model(copy.deepcopy(elva.PRESETS[args.preset]), tok).to(device)
    if init is not None:
        model.load_state_dict(elva.load_checkpoint(init, device)[0].state_dict())
        print(f"{name}: starts from {init}")
    compile_blocks(model, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    start = resume_point(args, folder, model, opt, name, device)
    if start >= steps:
        print(f"{name}: already complete ({steps} steps) in {folder}")
        return
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps x "
          f"{args.batch_size} {what}")
    retriever = elva.Retriever(model, tok)
    logger = Logger(folder, name, steps, start, args.log_every, rank_of(args) == 0)
    prof = Profiler(args.profile, name, start, steps)
    meta = {**source_meta(world), "args": serializable(args), "stage": name}
    model.train()
    inputs = step_inputs(args, functools.partial(make_inputs, args, world, retriever.enc, retriever.prompt_limit),
                         start, steps, device)
    for step in range(start, steps):
        prof.step_begins(step)
        # the batch, made ahead from the step's seed
        with phase("data"):
            batch = next(inputs)
        # the loss: InfoNCE over in-batch negatives (true matches masked) + the summaries' next-token loss
        loss, l_nce, l_lm = stage_step(args, retriever, batch, autocast, device)
        # the update: warm-up + cosine schedule, clipped AdamW step
        lr = lr_at(step, steps, args.lr, args.warmup)
        for gr in opt.param_groups:
            gr["lr"] = lr
        gnorm = optimizer_step(opt, model, loss, step, name, folder, args)
        # the log: on a GPU the values stay on the device until the next log line (no synchronisation per step)
        logger.log(step, {"loss": loss.detach(), "infonce": l_nce.detach(), "lm": l_lm.detach(), "lr": lr,
                          "grad_norm": gnorm.detach(), "masked_false_neg": int(batch["false_neg"].sum())},
                   args, lazy=device.type == "cuda")
        if step % args.log_every == 0:
            check_updates(opt, name, folder)
        prof.step_ends(step)
        if (step + 1) % args.ckpt_every == 0 or step == steps - 1:
            save(folder, model, tok, meta, opt, step, name, args)
    print(f"{name}: saved {folder}")


def serializable(args) -> dict:
    return {k: (v.__dict__ if isinstance(v, RewardConfig) else v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: ELVA (Section 3.4). Balanced negatives mined with the stage-2 model, then GRPO over generated embeddings.


def build_rl_instances(args, world, retriever, autocast):
    """For each task: RL queries on training scenes, each with its positive and n_hard + n_rand negatives mined from
    a pool of train scenes and their one-grain siblings (ELVA, Section 3.4, negative sampling)."""
    rng = random.Random(f"{args.seed}-rl-data")
    gen = torch.Generator().manual_seed(args.seed)
    instances = []
    for task in TASKS:
        pool = world.rl_pool(task, args.rl_pool_scenes, rng)
        queries = []
        while len(queries) < args.rl_queries:
            q = data.make_query(task, rng, rng.choice(pool).scene if task != "i2t" else
                                rng.choice(world.splits["train"]))
            if q is not None and q.item.target not in world.heldout:
                queries.append(q)
        rel = data.relevance_matrix(task, queries, pool)
        eq, _ = retriever.embed_items([q.item for q in queries], [INSTRUCTIONS[task]] * len(queries), autocast=autocast())
        ep, _ = retriever.embed_items(pool, [None] * len(pool), autocast=autocast())
        scores = (eq @ ep.T).cpu()                                             # (Q, P) stage-2 cosines
        neg = data.balanced_negatives(scores, rel, args.n_hard, args.n_rand, args.hard_threshold, gen)
        for q, idx in zip(queries, neg.tolist()):
            instances.append((q, [pool[i] for i in idx]))
    return instances


def build_rl_instances_mbeir(args, src: data.MBeirTrain, retriever, autocast):
    """build_rl_instances on M-BEIR: per training task, rl_queries queries, each with its first positive, n_hard
    hard negatives -- its neg_cand_list entries first, then mined: the stage-2 model's top-scoring non-positives
    (below --hard_threshold) of a pool sample of rl_pool_scenes candidates -- and n_rand random ones."""
    rng = random.Random(f"{args.seed}-rl-data")
    gen = torch.Generator().manual_seed(args.seed)
    instances = []
    for task in src.tasks:
        mine = [i for i, q in enumerate(src.queries) if q.task == task]
        mine = rng.sample(mine, min(args.rl_queries, len(mine)))
        cand = sorted(set(rng.sample(range(len(src.pool.items)), min(args.rl_pool_scenes, len(src.pool.items))))
                      | {j for i in mine for j in src.negatives[i]})
        rel = torch.tensor([[j in src.positives[i] for j in cand] for i in mine])           # (Q, P)
        if (~rel).sum(1).min() < args.n_hard + args.n_rand:
            raise SystemExit(f"--rl_pool_scenes {args.rl_pool_scenes}: task {task}'s mining sample has fewer than "
                             f"--n_hard + --n_rand = {args.n_hard + args.n_rand} non-positive candidates")
        eq, _ = retriever.embed_items([src.queries[i].item for i in mine], [src.queries[i].instruction for i in mine],
                                      autocast=autocast())
        ep, _ = retriever.embed_items([src.pool.items[j] for j in cand], [None] * len(cand), autocast=autocast())
        scores = (eq @ ep.T).cpu()                                                           # (Q, P) stage-2 cosines
        # the data's own hard negatives (neg_cand_list) score the threshold itself: above every mined candidate
        listed = torch.tensor([[j in src.negatives[i] for j in cand] for i in mine])        # (Q, P)
        key = torch.where(listed, torch.full_like(scores, args.hard_threshold), scores)
        neg = data.balanced_negatives(key, rel, args.n_hard, args.n_rand, args.hard_threshold, gen)
        for i, idx in zip(mine, neg.tolist()):
            instances.append((src.queries[i], [src.pool.items[cand[j]] for j in idx]))
    return instances


def rollout_scores(e: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """e (B, G, K, D): per rollout the query's embedding then its K - 1 candidates' -> cosine scores (B, G, K - 1)."""
    B, G, K, D = e.shape
    return cosine_scores(e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D), backend).view(B, G, K - 1)


@dataclass
class Rollout:
    """One GRPO rollout batch: B instances x G rollouts x K = 2 + N items (query, positive, N negatives), that is
    S = B * G * K sequences in (instance, rollout, item) order. The G rollouts of an item share its prompt, which is
    held once (U = B * K prompts); the per-sequence tensors cover the summary part: the summary, then [RET]."""
    batch: dict               # prompt_tokens / prompt_attn (U, P), images, index (S,): the prompt of each sequence;
                              # tokens / attn / gen_mask (S, Ts) and ret_pos (S,): the summary part
    sampled: torch.Tensor     # (S, Ts) bool: the tokens the policy sampled -- the summary, and [RET] unless forced
    logp: torch.Tensor        # (S, Ts) float32 log-probs of those tokens under the policy, with gradient
    h: torch.Tensor           # (S, Ts, D) final hidden states of the summary part, with gradient
    e: torch.Tensor           # (B, G, K, D) unit [RET] embeddings, no gradient
    scores: torch.Tensor      # (B, G, K - 1) cosine of each rollout's query to its positive (0) and negatives
    summaries: list = field(default_factory=list)   # S sampled summaries (token ids)
    ended: list = field(default_factory=list)       # S bools: the summary sampled its [RET] (False: forced)
    queries: list = field(default_factory=list)     # the B instances' Query objects

    @property
    def shape(self):
        return tuple(self.e.shape[:3])                                          # (B, G, K)


def instruction_of(q: data.Query) -> str:
    """A query's instruction: its own (real data) or its task's (GrainWorld)."""
    return q.instruction if q.instruction is not None else INSTRUCTIONS[q.task]


def rollout_items(batch, G: int = 1):
    """The items of a rollout batch, (instance, rollout, item) order, and their instructions: the query gets its
    task's instruction, candidates none (as in M-BEIR's pools). G = 1: each item once (the shared prompts)."""
    items, instr = [], []
    for q, negs in batch:
        for _ in range(G):
            items += [q.item, q.positive, *negs]
            instr += [instruction_of(q)] + [None] * (1 + len(negs))
    return items, instr


def make_rl_inputs(args, instances, enc, limit, step: int) -> dict:
    """The ELVA stage's step `step` without the model (a DataLoader worker can make it ahead): the global batch of
    rl_batch instances drawn from the step's seed (so --resume replays it), this process's share, and its unique
    items' prompts encoded (rendered, tokenised, left-padded; no summaries yet)."""
    rng = random.Random(f"{args.seed}-rl-batch-{step}")
    batch = my_share(rng.sample(instances, args.rl_batch), args)       # the global batch, then this share
    items, instr = rollout_items(batch)
    return {"batch": batch, "encoded": data.encode_batch(enc, items, instr, None, limit)}


def rollout(args, policy: elva.Retriever, batch, gen: torch.Generator, autocast, encoded=None) -> Rollout:
    """For each of B instances and each of G rollouts, sample a summary for the query, the positive and every
    negative, embed all at [RET] and score each rollout's candidates against its query.

    Each item's prompt is read once and shared by its G rollouts (generation and the teacher-forced pass expand
    its KV cache). The teacher-forced pass that embeds the rollouts runs with gradient, so its log-probs serve the
    first policy update too (no second forward)."""
    B, G, K = len(batch), args.group_size, 2 + len(batch[0][1])
    with phase("data"):   # prompts (U, P) of the U = B * K unique items, left-padded; made ahead when `encoded`
        pb, images = policy.batch(*rollout_items(batch), None) if encoded is None else policy.on_device(*encoded)
    dev = pb["tokens"].device
    # row (b, g, k) continues prompt b * K + k
    index = (torch.arange(B, device=dev)[:, None, None] * K + torch.arange(K, device=dev)).expand(B, G, K).reshape(-1)
    with phase("generate"), autocast():
        if args.sample == "all":   # the paper: every summary of every rollout is sampled
            summ, ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=args.temperature,
                                                generator=gen, return_ended=True, index=index)
            fixed = torch.zeros(len(index), dtype=torch.bool, device=dev)
        else:
            summ, ended, fixed = BEYOND_THE_PAPER["sample"](args, policy, pb, images, index, gen, K)
    sb = {k: v.to(dev) for k, v in data.collate_summaries(summ, policy.enc.pad, policy.enc.ret).items()}
    rb = {"prompt_tokens": pb["tokens"], "prompt_attn": pb["attn"], "images": images, "index": index, **sb}
    # a [RET] appended after max_summary_len tokens was not sampled: it gets no advantage and no KL
    forced = ~torch.tensor(ended, device=dev)
    sampled = sb["gen_mask"].clone()
    sampled[torch.arange(len(summ), device=dev)[forced], sb["ret_pos"][forced]] = False
    sampled[fixed] = False                                                     # (--sample query: not sampled)
    with phase("forward"), autocast():
        logp, h = policy.model.shared_prefix_logprobs(rb, args.temperature)
    with phase("score"), torch.no_grad():
        e = policy.model.ret_embedding(h, sb["ret_pos"]).view(B, G, K, -1)        # (B, G, K, D)
        scores = rollout_scores(e)                                                  # (B, G, K - 1)
    return Rollout(rb, sampled, logp.float(), h, e, scores, summ, ended, [q for q, _ in batch])


def grpo_step(args, policy, ref_model, opt, batch, gen, autocast, step, folder: Path, encoded=None) -> dict:
    """ELVA's GRPO step (Section 3.4), in the paper's order:
      1. rollout     G sampled summaries of every item -> [RET] embeddings -> each rollout's ranked candidate list
      2. reward      R_total = alpha R_Margin + epsilon R_Rank of each rollout's list
      3. advantage   A = (R - mean) / (std + eps) over the query's G rollouts, shared by all the rollout's summaries
      4. loss        PPO-clipped policy gradient on the sampled summary tokens + beta * KL(k3) to the stage-2 model
      5. update      clipped AdamW step (num_iterations > 1: more updates on the same rollouts, ratio != 1)
    Our labelled variants (--sample, --reward, --credit, --pathwise, --anchor) change step 1's sampling, replace step
    2 or 3, or add to 4: see BEYOND_THE_PAPER."""
    variant = BEYOND_THE_PAPER
    # 1. rollout
    ro = rollout(args, policy, batch, gen, autocast, encoded)
    B, G, K = ro.shape
    # 2. reward, from the scores alone (no gradient)
    if args.reward == "paper":
        R, parts = args.reward_cfg(ro.scores.cpu(), return_parts=True)      # (B, G)
    else:
        R, parts = variant["reward"](args, ro, policy)
    # 3. group advantage, one per rollout, the same for each of its K summaries
    A = group_advantages(R)                                                    # (B, G)
    A_seq = A[:, :, None].expand(B, G, K).reshape(-1)                          # (S,)
    if args.credit != "rollout":
        A_seq = variant["credit"](args, ro)
    A_seq = A_seq.to(ro.logp.device)
    # 4. loss: the rollout policy's log-probs are the "old" ones; the frozen stage-2 model is the KL reference
    old_logp = ro.logp.detach()
    with phase("reference"), torch.no_grad(), autocast():
        ref_logp, ref_h = ref_model.shared_prefix_logprobs(ro.batch, args.temperature)
        e_ref = ref_model.ret_embedding(ref_h, ro.batch["ret_pos"])           # (S, D): the stage-2 map, same words
    logp, h = ro.logp, ro.h                                                    # on-policy: ratio exactly 1
    n_tokens = global_tokens(ro.sampled, args)                                 # None without torchrun
    for it in range(args.num_iterations):
        if it > 0:   # a further update on the same rollouts (PPO-style reuse; the ratio now differs from 1)
            with autocast():
                logp, h = policy.model.shared_prefix_logprobs(ro.batch, args.temperature)
        loss, info = grpo_loss(logp.float(), old_logp, ref_logp.float(), A_seq, ro.sampled, args.clip_eps, args.beta,
                               n_tokens=n_tokens)
        if args.pathwise > 0:
            loss = loss + variant["pathwise"](args, ro, policy, h)
        if args.anchor > 0:
            loss = loss + variant["anchor"](args, ro, policy, h, e_ref)
        # 5. update
        optimizer_step(opt, policy.model, loss, step, "elva", folder, args)
    return {"loss": loss.item(), **diagnostics(args, ro, R, parts, A_seq, info, policy, e_ref)}


def global_tokens(mask: torch.Tensor, args) -> float | None:
    """Under torchrun: the sampled tokens of the whole batch / the processes, so that the token-mean of grpo_loss
    averaged over the processes is the token-mean over the whole batch. None (the local count) otherwise."""
    if world_of(args) == 1:
        return None
    n = mask.sum().float()
    dist.all_reduce(n)
    return float(n) / world_of(args)


def diagnostics(args, ro: Rollout, R, parts, A_seq, info, policy, e_ref) -> dict:
    """What one log line says about the step's signal. `tied_groups`: groups whose G rewards all tie (no gradient).
    `corr_len` / `corr_exact`: the mean, over groups, of the correlation between a rollout's reward and its summaries'
    mean length / whether its query summary is exactly the reference -- what the reward pays for. `pg` / `kl_term`:
    the policy-gradient part of the loss and beta * KL. `adv_query`: the share of the batch's |advantage| mass (over
    sampled tokens) that sits on query summaries rather than candidate summaries. `drift`: the mean cosine distance
    between the policy's and the stage-2 model's (e_ref) embeddings of the same sampled words -- how far the map from
    words to embeddings has moved, which the policy gradient does not see."""
    B, G, K = ro.shape
    lens = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32).view(B, G, K)
    exact = torch.tensor([[float(policy.enc.decode(ro.summaries[(b * G + g) * K]) == q.item.summary)
                           for g in range(G)] for b, q in enumerate(ro.queries)])                    # (B, G)

    def group_corr(x, y):   # mean over groups of Pearson's r; a group where either side is constant counts 0
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        den = (x.norm(dim=1) * y.norm(dim=1))
        return torch.where(den > 1e-12, (x * y).sum(1) / den.clamp(min=1e-12), torch.zeros_like(den)).mean().item()

    tok_adv = A_seq.abs().cpu()[:, None] * ro.sampled.cpu().float()                                 # (S, T)
    per_item = tok_adv.sum(1).view(B, G, K)
    return {"reward_mean": R.mean().item(), "reward_std": R.std().item(),
           "R_margin": parts["margin"].float().mean().item(), "R_rank": parts["rank"].float().mean().item(),
           "top1": (parts["pos_rank"] == 1).float().mean().item(),
           "tied_groups": ((R.max(1).values - R.min(1).values) < 1e-6).float().mean().item(),
           "kl": info["kl"].item(), "clip_low": info["clip_low"].item(), "clip_high": info["clip_high"].item(),
           "summary_len": lens.mean().item(), "query_exact": exact.mean().item(),
           "corr_len": group_corr(R.float(), lens.mean(2)), "corr_exact": group_corr(R.float(), exact),
           "adv_query": (per_item[:, :, 0].sum() / per_item.sum().clamp(min=1e-12)).item(),
           "pg": info["pg"].item(), "kl_term": args.beta * info["kl"].item(),
           "drift": (1 - (ro.e.reshape(e_ref.shape) * e_ref).sum(-1)).mean().item()}


def elva_stage(args, device, autocast):
    init = Path(args.init or Path(args.out) / "contrastive")
    folder = Path(args.out) / args.elva_name
    ref = elva.Retriever.from_pretrained(init, device)  # the frozen stage-2 model: KL anchor and negative miner
    init_meta = ref.meta
    if not isinstance(init_meta.get("world"), dict) and not isinstance(init_meta.get("mbeir"), dict):
        _fail("--init", str(init), "a stage-2 checkpoint whose config.json has a 'world' (or 'mbeir') section")
    world = read_source(args, init_meta)   # the stage-2 model's data; --seed varies only RL here
    model = copy.deepcopy(ref.model).train()                 # the policy starts as the stage-2 model
    for p in ref.model.parameters():
        p.requires_grad_(False)
    # the paper freezes the vision encoder and trains the language model (with LoRA, at 7B; our decoder is small
    # enough to train whole): the vision tower and projector stay as stage 2 left them unless --train_vision
    if not args.train_vision:
        for p in model.vision_parameters():
            p.requires_grad_(False)
    compile_blocks(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.rl_lr, weight_decay=0.0, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    start = resume_point(args, folder, model, opt, args.elva_name, device)
    if start >= args.rl_steps:
        print(f"{args.elva_name}: already complete ({args.rl_steps} steps) in {folder}")
        return
    t0 = time.time()
    instances = (build_rl_instances_mbeir if isinstance(world, data.MBeirTrain) else build_rl_instances)(
        args, world, ref, autocast)
    C = 1 + args.n_hard + args.n_rand
    print(f"{args.elva_name}: mined {len(instances)} RL instances ({args.n_hard} hard + {args.n_rand} random "
          f"negatives each) in {time.time() - t0:.0f}s; objective {args.rl_objective}, reward {args.reward}, "
          f"{args.rl_steps} steps x {args.rl_batch} queries x G={args.group_size}; alpha {args.alpha}, epsilon "
          f"{args.epsilon}, delta {args.delta}, gamma {args.reward_cfg.gamma_for(C):.4f}"
          f"{' (auto for C = %d candidates)' % C if args.gamma is None else ''}; trains "
          f"{sum(p.numel() for p in trainable) / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters{' (vision frozen)' if not args.train_vision else ''}")
    policy = elva.Retriever(model, ref.tok)
    logger = Logger(folder, args.elva_name, args.rl_steps, start, args.log_every, rank_of(args) == 0)
    meta = {**source_meta(world), "args": serializable(args), "stage": "elva", "init": str(init)}
    gen = torch.Generator(device=device)
    prof = Profiler(args.profile, args.elva_name, start, args.rl_steps)
    inputs = step_inputs(args, functools.partial(make_rl_inputs, args, instances, policy.enc, policy.prompt_limit),
                         start, args.rl_steps, device)
    for step in range(start, args.rl_steps):
        prof.step_begins(step)
        # per-step seeds for the batch and the sampling, so --resume replays the same steps
        gen.manual_seed(args.seed * 100003 + step + 7919 * rank_of(args))   # each process samples its own rollouts
        with phase("data"):
            made = next(inputs)                                             # this step's instances, encoded ahead
        batch = made["batch"]
        if args.rl_objective == "grpo":
            rec = grpo_step(args, policy, ref.model, opt, batch, gen, autocast, step, folder, made["encoded"])
        else:
            rec = control_step(args, policy, opt, batch, autocast, step, folder, init_meta)
        logger.log(step, rec, args)
        if step % args.log_every == 0:
            check_updates(opt, args.elva_name, folder)
        prof.step_ends(step)
        if (step + 1) % args.ckpt_every == 0 or step == args.rl_steps - 1:
            save(folder, model, ref.tok, meta, opt, step, args.elva_name, args)
    print(f"{args.elva_name}: saved {folder} ({time.time() - t0:.0f}s)")


# ----------------------------------------------------------------------------------------------------------------------
# Beyond the paper: our labelled variants of stage 3, each off by default, and the equal-compute control.


def toy_reward(texts: list[str]) -> float:
    """A verifiable toy reward for checking GRPO itself: the fraction of colour words among summary words."""
    words = [w for t in texts for w in t.replace(";", " ").split()]
    return sum(w in data.COLORS for w in words) / max(1, len(words))


def lexical_reward(args, ro: Rollout, policy) -> tuple[torch.Tensor, dict]:
    """--reward toy | length: a reward we know GRPO can reach, computed from the rollout's summaries alone.
    toy: the fraction of colour words; length: minus the mean summary length in tokens (on worlds where the model's
    own summaries hurt retrieval, writing less is a policy that ranks better)."""
    B, G, K = ro.shape
    if args.reward == "toy":
        texts = [policy.enc.decode(s) for s in ro.summaries]
        R = torch.tensor([toy_reward(texts[i * K:(i + 1) * K]) for i in range(B * G)]).view(B, G)
    else:
        R = -torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32).view(B, G, K).mean(2)
    _, parts = args.reward_cfg(ro.scores.cpu(), return_parts=True)   # still logged: does the ranking move?
    return R, parts


def sequence_credit_advantages(args, ro: Rollout) -> torch.Tensor:
    """--credit sequence: each summary's own credit (reward.sequence_credit), normalised over the group per item
    slot. -> (S,) advantages in (instance, rollout, item) order."""
    B, G, K = ro.shape
    en = ro.e.float().cpu()                                                    # (B, G, K, D)
    S = torch.einsum("bqd,bgjd->bqgj", en[:, :, 0], en[:, :, 1:])             # (B, G', G, K - 1)
    credit = sequence_credit(S, args.reward_cfg)                               # (B, G, K)
    A = group_advantages(credit.permute(0, 2, 1).reshape(-1, G))               # (B * K, G)
    return A.view(B, K, G).permute(0, 2, 1).reshape(-1)                        # (S,)


def pathwise_loss(args, ro: Rollout, policy, h) -> torch.Tensor:
    """--pathwise w: R_total is differentiable almost everywhere in the scores, so -w * R_total's gradient through
    the embeddings (of the sampled summaries) is added to GRPO's."""
    e = policy.model.ret_embedding(h, ro.batch["ret_pos"]).view(*ro.shape, -1)   # (B, G, K, D)
    R_path = args.reward_cfg(rollout_scores(e, backend="torch"), backend="torch")  # the differentiable reference
    return -args.pathwise * R_path.mean()


def anchor_loss(args, ro: Rollout, policy, h, e_ref) -> torch.Tensor:
    """--anchor w: w * mean(1 - cos(policy embedding, stage-2 embedding)) over the rollout's sequences, the same
    (input, sampled summary) pairs through both models. GRPO's gradient only sees the log-probs of the words; but
    the same weights also make the embeddings, so each update moves the map from words to embeddings too, and the
    reward the next rollout sees has shifted under the policy (the ladder: at lr 1e-3 the paper's reward *falls*).
    The anchor holds that map near stage 2's, so that what changes is which words are written."""
    e = policy.model.ret_embedding(h, ro.batch["ret_pos"])                    # (S, D), with gradient
    return args.anchor * (1 - (e * e_ref).sum(-1)).mean()


def sample_queries_only(args, policy, pb, images, index, gen, K):
    """--sample query: sample the G summaries of each query; give each candidate its greedy summary, the same in
    every rollout (and not trained). Within a group the candidates' embeddings are then identical, so the rewards
    differ by the query's words alone: each rollout's advantage is the credit of exactly one sampled summary.
    -> (summaries, ended, fixed (S,) bool: rows whose summary was not sampled), rows in (instance, rollout, item)."""
    is_query = index % K == 0                                                  # (S,): item 0 of each rollout
    q_rows = is_query.nonzero()[:, 0]
    sampled, s_ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=args.temperature,
                                             generator=gen, return_ended=True, index=index[q_rows])
    greedy, g_ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=0.0, return_ended=True)
    summ, ended, it = [], [], iter(zip(sampled, s_ended))
    for s, u in enumerate(index.tolist()):
        if is_query[s]:
            a, b = next(it)
        else:
            a, b = greedy[u], g_ended[u]
        summ.append(a)
        ended.append(b)
    return summ, ended, ~is_query


BEYOND_THE_PAPER = {"reward": lexical_reward, "credit": sequence_credit_advantages, "pathwise": pathwise_loss,
                    "anchor": anchor_loss, "sample": sample_queries_only}


def control_step(args, policy, opt, batch, autocast, step, folder: Path, init_meta: dict) -> dict:
    """The equal-compute control (--rl_objective contrastive): stage 2 continued -- stage 2's exact loss (InfoNCE
    with summary dropout + next-token loss, its tau, lm_weight and dropout rate) -- over the same candidate sets
    (positive + the mined negatives), one optimizer step per batch as GRPO takes."""
    stage2 = argparse.Namespace(**{k: init_meta.get("args", {}).get(k, getattr(args, k))
                                   for k in ("tau", "lm_weight", "summary_dropout")},
                                world_size=world_of(args), rank=rank_of(args))
    end = init_meta.get("args", {}).get("summary_dropout_end")
    if end is not None:   # an annealed stage 2 is continued at its final rate
        stage2.summary_dropout = end
    policy.model.train()
    items, instr = [], []
    for q, negs in batch:
        items += [q.item, q.positive, *negs]
        instr += [instruction_of(q)] + [None] * (1 + len(negs))
    rng = random.Random(f"{args.seed}-control-{step}")
    drop = my_share([rng.random() < stage2.summary_dropout for _ in range(len(items) * world_of(args))], args)
    loss, l_nce, l_lm = stage2_loss(stage2, policy, items, instr, drop, autocast, group=2 + len(batch[0][1]))
    optimizer_step(opt, policy.model, loss, step, "control", folder, args)
    return {"loss": loss.item(), "infonce": l_nce.item(), "lm": l_lm.item()}


# ----------------------------------------------------------------------------------------------------------------------


def evaluate_mbeir_run(args, out: Path, device, threads: int):
    """After training on M-BEIR: eval.py --mbeir on the test split, per checkpoint of this run (its own process)."""
    test_tasks = data.mbeir_tasks(args.mbeir, "test")
    tasks = args.eval_tasks or ("all" if args.train_tasks == ["all"] else
                                ",".join(t for t in args.train_tasks if t in test_tasks))
    if not tasks or not test_tasks:
        print(f"eval: skipped; {args.mbeir} has no test query file for the training tasks (give --eval_tasks)")
        return
    for c in ("contrastive", args.elva_name):
        if (out / c / "config.json").exists():
            cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), "--ckpt", str(out / c), "--mbeir",
                   args.mbeir, "--tasks", tasks, "--split", "test", "--out", str(out / f"eval_{c}.json"),
                   "--device", str(device), "--threads", str(threads)]
            print("eval:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def main(argv=None):
    args = get_args(argv)
    init_distributed(args)
    threads = set_threads(args)
    device, autocast = elva.resolve_device(args.device)
    print(f"threads: {threads}" + (f" | process {args.rank} of {args.world_size}" if args.world_size > 1 else ""))
    if args.rank == 0:
        check_run_folder(args)
    barrier(args)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    print("args:", json.dumps(serializable(args)))
    t0 = time.time()
    if "contrastive" in args.stages:
        world = read_source(args)
        if args.rank == 0:
            build_tokenizer(args, world)
        barrier(args)
        tok = build_tokenizer(args, world)   # the first process trained and wrote it
        if isinstance(world, data.MBeirTrain):
            print(f"M-BEIR: {len(world.queries)} training queries of {world.tasks} against a pool of "
                  f"{len(world.pool.items)} | tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)")
        else:
            print(f"world: {len(world.splits['train'])} train / {len(world.splits['test'])} test scenes | "
                  f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)")
        if "text" in args.stages:
            text_stage(args, world, tok, device, autocast)
        contrastive_stage(args, world, tok, device, autocast)
    if "elva" in args.stages:
        elva_stage(args, device, autocast)
    if not args.no_eval and args.rank == 0 and args.mbeir:
        evaluate_mbeir_run(args, out, device, threads)
    elif not args.no_eval and args.rank == 0:
        ckpts = [c for c in ("contrastive", args.elva_name) if (out / c / "config.json").exists()]
        cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), "--out", str(out / "eval.json"),
               "--queries", str(args.eval_queries), "--mrbench_per_task", str(args.mrbench_per_task),
               "--device", str(device), "--threads", str(threads)]
        for c in ckpts:
            cmd += ["--ckpt", str(out / c)]
        print("eval:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)   # eval.py is a program of its own: nothing imports it
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    if args.world_size > 1:
        barrier(args)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
