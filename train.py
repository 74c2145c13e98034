"""
Training: the paper's three stages (ELVA, Sections 3.3-3.4), top to bottom, after ours.
  stage 0  (ours, opt-in) the next-token loss of images' summaries   describe_stage
  stage 1  language-only InfoNCE on NLI-style caption triplets       text_stage
  stage 2  InfoNCE on [RET] embeddings + the summaries' LM loss      contrastive_stage
  stage 3  ELVA: negatives mined by the stage-2 model, then GRPO     elva_stage, grpo_step
           on the margin and ranking rewards, KL to stage 2

    python train.py                  # gpu preset on CUDA, else cpu; then eval.py
    python train.py --preset smoke   # the whole pipeline in a minute on 2 CPU cores
    python train.py --mbeir ROOT     # stages 2-3 on M-BEIR (mbeir.py --sample DIR: one)
    torchrun --nproc_per_node=N train.py   # data-parallel (GPUs, or CPUs with gloo)

This file is the paper (and our stage 0); our variants and the control are in study/. Each
stage is a loop: batch, step, log line, checkpoint. runtime.py holds the machinery a reader
may skip. Outputs under --out (default runs/<preset>): a folder per stage, eval.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import elva
from data import TASKS, Instances, Pairs, Source, WorldConfig
from kernels import cosine_ranks
from retriever import Retriever, encode_pairs, encode_rollout, mine_instances
from reward import (ALPHA, DEFAULT_DELTA, EPSILON, auto_gamma, group_advantages, grpo_loss,
                    ordered_gamma_limit, total_reward)
from runtime import Parser, Run, check_device, fail, number, one_line_errors

phase = torch.profiler.record_function     # labels a step's phases in --profile's table


# ----------------------------------------------------------------------------------------
# Presets: the world's and each stage's sizes (the model's: elva.PRESETS). Keys with no
# flag here (n_train, rl_queries, ...): the study's flags.

TRAIN_PRESETS = {
    # smoke: the whole pipeline in under a minute on 2 CPU cores (tests, CI)
    "smoke": dict(n_train=400, n_test=60, batch_size=16, lr=2e-3,
                  stages="describe,text,contrastive,elva", describe_steps=10, describe_lr=2e-3,
                  text_steps=10, scene_premises=0.0, describe_every=4,
                  steps=40, text_every=4,
                  rl_steps=6, rl_batch=2, group_size=4, n_hard=2, n_rand=2, rl_queries=8,
                  rl_pool_scenes=20, eval_queries=20, mrbench_per_task=6, log_every=5),
    # cpu: the default without a GPU (about 34 minutes on 2 cores; docs/results.md)
    "cpu": dict(n_train=6000, n_test=500, batch_size=48, lr=1e-3,
                stages="text,contrastive,elva", describe_steps=500, describe_lr=2e-3,
                text_steps=1500, scene_premises=0.0, describe_every=4,
                steps=1000, text_every=4,
                rl_steps=150, rl_batch=2, group_size=8, n_hard=4, n_rand=4, rl_queries=200,
                rl_pool_scenes=300, eval_queries=200, mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, batch_size=128, lr=5e-4,
                stages="text,contrastive,elva", describe_steps=2000, describe_lr=1e-3,
                text_steps=3000, scene_premises=0.0, describe_every=4,
                steps=6000, text_every=4,
                rl_steps=400, rl_batch=8, group_size=8, n_hard=16, n_rand=16,
                rl_queries=1000, rl_pool_scenes=1500, eval_queries=250,
                mrbench_per_task=250, log_every=50),
}
STAGES = ("describe", "text", "contrastive", "elva")   # stages 0-3
# Every preset's: AdamW's decay and warm-up, one GRPO update a batch, stage 3's folder
COMMON = dict(weight_decay=0.05, warmup=0.05, num_iterations=1, elva_name="elva")
# What decides the world, the tokenizer and the model's shape: one value per run folder.
SHAPING_ARGS = ("preset", "seed", "world_seed", "n_train", "n_test", "vocab_size", "mbeir",
                "train_tasks", "mbeir_pool", "summary_field")
# What stage 3's console line shows (log.jsonl keeps every value)
ELVA_SHOWN = ("loss", "reward_mean", "R_rank", "top1", "tied_groups", "kl", "summary_len")


def gamma_flag(text: str):
    """--gamma: 'auto' (None: reward.auto_gamma) or a number >= 0."""
    try:
        return None if text == "auto" else number(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text}: expected 'auto' or a finite number >= 0")


def build_parser() -> Parser:
    """The paper's knobs and the run's essentials, one flag each (the study adds its own)."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count, every = number(1, kind=int), number(0, kind=int)
    positive, unit = number(0, above=True), number(0, 1)
    add = p.add_argument_group("run").add_argument
    add("--preset", default=None, choices=list(TRAIN_PRESETS),
        help="default gpu on CUDA, else cpu")
    add("--out", default=None, help="output folder (default runs/<preset>)")
    add("--seed", type=int, default=0, help="seed of the world, model and sampling")
    add("--stages", default=None, help="of describe, text, contrastive, elva (default the "
        "preset's; contrastive,elva with --mbeir)")
    p.add_run_flags()   # --resume, --device, --threads, --profile, ... (runtime.py)
    add = p.add_argument_group("data: GrainWorld, or M-BEIR in UniIR's layout").add_argument
    add("--vocab_size", type=number(300, kind=int), default=512,
        help="BPE vocabulary size (>= 300: 256 bytes, 5 special tokens, merges)")
    add("--world_seed", type=int, default=None, help="GrainWorld's seed (default --seed)")
    add("--mbeir", default=None, help="an M-BEIR root: its train split, then its test")
    add("--train_tasks", default="all", help="M-BEIR training tasks (comma list) or all")
    add("--mbeir_pool", default="union", choices=["union", "local"], help="M-BEIR's pool")
    add("--summary_field", default=None, help="an M-BEIR field holding a summary")
    add("--eval_tasks", default=None, help="M-BEIR tasks to evaluate (default: trained)")
    add = p.add_argument_group("stage 0: describe (ours; batch: stage 2's)").add_argument
    add("--describe_steps", type=count, default=None, help="optimizer steps")
    add("--describe_lr", type=positive, default=None, help="peak AdamW learning rate")
    add = p.add_argument_group("stage 1: text (Sec. 3.3); batch, lr, tau: stage 2's").add_argument
    add("--text_steps", type=count, default=None, help="optimizer steps")
    add("--scene_premises", type=unit, default=None,
        help="premises that are a scene's summary as text (ours)")
    add("--describe_every", type=every, default=None,
        help="a stage-0 batch every N steps (ours; 0: none)")
    add = p.add_argument_group("stage 2: contrastive (Sec. 3.3)").add_argument
    add("--steps", type=count, default=None, help="optimizer steps")
    add("--batch_size", type=number(2, kind=int), default=None,
        help="queries per step, each with its positive (>= 2)")
    add("--lr", type=positive, default=None, help="peak AdamW learning rate")
    add("--tau", type=number(0.005, 10), default=0.05, help="InfoNCE temperature")
    add("--lm_weight", type=number(0), default=3.0, help="weight of the next-token loss (ours)")
    add("--summary_dropout", type=unit, default=0.25,
        help="items embedded with no summary (ours)")
    add("--text_every", type=every, default=None,
        help="a stage-1 batch every N steps (ours; 0: none)")
    add = p.add_argument_group("stage 3: ELVA (Sec. 3.4)").add_argument
    add("--init", default=None, help="start checkpoint (default <out>/contrastive)")
    add("--rl_steps", type=count, default=None, help="optimizer steps")
    add("--rl_batch", type=count, default=None, help="queries per step")
    add("--group_size", type=number(2, kind=int), default=None,
        help="G: rollouts per query (paper 8)")
    add("--n_hard", type=every, default=None, help="hard negatives per query (paper 50)")
    add("--n_rand", type=every, default=None, help="random negatives per query (paper 50)")
    add("--hard_threshold", type=number(-1, 1), default=0.95,
        help="hard negatives above this stage-2 cosine are dropped (false negatives?)")
    add("--rl_lr", type=positive, default=1e-5, help="AdamW's lr (paper 1e-6, 7B + LoRA)")
    add("--temperature", type=positive, default=1.0, help="the summaries' sampling temperature")
    add("--clip_eps", type=number(0, 1, above=True), default=0.2,
        help="PPO clip range of the ratio (TRL's epsilon)")
    add("--beta", type=number(0), default=0.2, help="KL coefficient (paper 0.2)")
    add("--alpha", "--margin_weight", dest="alpha", type=number(0), default=ALPHA,
        help="weight of R_Margin (paper 0.4)")
    add("--epsilon", "--rank_weight", dest="epsilon", type=number(0), default=EPSILON,
        help="weight of R_Rank (paper 0.6; TRL's epsilon is --clip_eps)")
    add("--delta", type=number(0), default=DEFAULT_DELTA, help="margin of R_Margin")
    add("--gamma", type=gamma_flag, default=None,
        help="R_Rank's negative weight: auto, or below reward.ordered_gamma_limit(C)")
    add("--train_vision", action="store_true", help="train the vision tower (paper: frozen)")
    add("--loss_norm", default="token", choices=["token", "sequence"], help="GRPO's mean")
    return p


def get_args(argv=None, parser=None):
    """train.py's flags (or the study's superset), the preset's values where a flag was not
    given, then what no single flag's range says -- all before any work."""
    args = (parser or build_parser()).parse_args(argv)
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = {**COMMON, **TRAIN_PRESETS[args.preset]}
    if args.mbeir:   # no stages 0-1 on M-BEIR: no reference summaries, no NLI triplets
        preset["stages"] = "contrastive,elva"
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"runs/{args.preset}"
    args.world_seed = args.seed if args.world_seed is None else args.world_seed
    args.stages = [s.strip() for s in args.stages.split(",")]
    args.train_tasks = [s.strip() for s in args.train_tasks.split(",") if s.strip()]
    check_device(args.device)
    check_flags(args)
    return args


def check_flags(args):
    """The stages, the data's sizes and the reward's order."""
    stages, out, grainworld = ",".join(args.stages), Path(args.out), args.mbeir is None
    if not args.stages or any(s not in STAGES for s in args.stages):
        fail("--stages", stages, f"a comma list of {', '.join(STAGES)}")
    for later, first in (("contrastive", "text"), ("text", "describe")):
        if first in args.stages and later not in args.stages:
            fail("--stages", stages, f"{first} together with {later} (which starts from it)")
    if not grainworld and not (Path(args.mbeir) / "query" / "train").is_dir():
        fail("--mbeir", args.mbeir, "an M-BEIR root holding query/train/ (and cand_pool/, "
                                    "instructions/)")
    if grainworld and (args.eval_tasks is not None or args.train_tasks != ["all"]):
        flag = "--eval_tasks" if args.eval_tasks is not None else "--train_tasks"
        value = args.eval_tasks if args.eval_tasks is not None else ",".join(args.train_tasks)
        fail(flag, value, "M-BEIR tasks together with --mbeir (GrainWorld has its four)")
    if not grainworld and ("text" in args.stages or "describe" in args.stages):
        fail("--stages", stages, "contrastive and/or elva with --mbeir (stages 0-1 are "
                                 "made of GrainWorld's scenes and captions)")
    if grainworld and args.batch_size > args.n_train:
        fail("--batch_size", args.batch_size, f"at most the {args.n_train} training scenes "
                                              f"(--n_train) a batch is drawn from")
    n_neg = args.n_hard + args.n_rand
    if grainworld and n_neg >= args.rl_pool_scenes:
        fail("--n_hard + --n_rand", n_neg, f"fewer than the {args.rl_pool_scenes} training "
                                           f"scenes of each task's mining pool")
    if n_neg < 1:
        fail("--n_hard + --n_rand", n_neg, ">= 1: a ranking needs a negative")
    if grainworld and args.rl_batch > len(TASKS) * args.rl_queries:
        fail("--rl_batch", args.rl_batch, f"<= the RL instances ({len(TASKS)} tasks x "
                                         f"--rl_queries {args.rl_queries})")
    C = 1 + n_neg
    if args.gamma is not None and args.gamma >= ordered_gamma_limit(C):
        works = [c for c in range(2, C) if args.gamma < ordered_gamma_limit(c)]
        fewer = f", or at most {works[-1]} candidates" if works else ""
        fail("--gamma", args.gamma, f"below {ordered_gamma_limit(C):.4f} at C = {C} "
             f"candidates (1 + --n_hard + --n_rand){fewer}: a larger gamma pays R_Rank "
             f"more for the positive ranked lower; 'auto' keeps the order")
    if out.exists() and not out.is_dir():
        fail("--out", args.out, "a folder (this path is a file)")
    if any((out / d).is_dir() for d in ("query", "cand_pool")):
        fail("--out", args.out, "a folder for runs, not an M-BEIR root (it holds query/ or "
                                "cand_pool/)")


def read_source(args, meta: dict | None = None) -> Source:
    """The training data, read and checked whole before any work: from the flags, or (stage
    3) from the stage-2 checkpoint's record, so that ELVA trains on the data stage 2 saw."""
    if meta is None and args.mbeir:
        import mbeir   # real data, only when asked for
        meta = mbeir.meta_of(args)
    if meta is None:
        world = WorldConfig(args.world_seed, args.n_train, n_test=args.n_test,
                            image_size=elva.PRESETS[args.preset].image_size)
        meta = {"world": world.__dict__}
    if isinstance(meta.get("mbeir"), dict):
        import mbeir
        return mbeir.training_source(meta["mbeir"], args)
    if isinstance(meta.get("world"), dict):
        return data.grainworld_source(WorldConfig(**meta["world"]))
    fail("--init", args.init, "a checkpoint trained on GrainWorld or M-BEIR")


def new_model(args, tok, device, init=None) -> elva.ELVAModel:
    """A fresh model (seeded) of the preset's shape, or init's weights."""
    torch.manual_seed(args.seed)
    model = elva.build_model(copy.deepcopy(elva.PRESETS[args.preset]), tok).to(device)
    if init is not None:
        model.load_state_dict(Retriever.from_pretrained(init, device).model.state_dict())
        print(f"starts from {init}")
    if args.compile:   # each block compiled in place: names and checkpoints stay
        for blk in [*model.vit, *model.blocks]:
            blk.compile(dynamic=True)
    return model


def adamw(params, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98),
                             fused=device.type == "cuda")


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------
# Stages 1 and 2 (Section 3.3): InfoNCE on the [RET] embeddings of teacher-forced
# reference summaries, plus the summaries' next-token loss, which teaches our from-scratch
# model to write summaries at all (Qwen2-VL already can). The paper's stages 1-2 embed at
# a fixed prompt token (LamRA's "in one word: <emb>"); ours embed at [RET] after the
# summary, so that one template serves all three stages.


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg=None, target_offset=0):
    """L = -1/N sum_n log(exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau))  (Sec. 3.3)

    eq (N, D); ec (M, D), query n's positive at n + target_offset, or (N, M, D), each row's
    at 0. false_neg (N, M) masks candidates known to be relevant: a true match is not pushed."""
    if ec.dim() == 2:
        logits = eq @ ec.T / tau                                               # (N, M)
        target = torch.arange(eq.shape[0], device=eq.device) + target_offset
    else:
        logits = torch.einsum("nd,nmd->nm", eq, ec) / tau                      # (N, M)
        target = torch.zeros(eq.shape[0], dtype=torch.long, device=eq.device)
    if false_neg is not None:
        logits = logits.masked_fill(false_neg, float("-inf"))
    return F.cross_entropy(logits.float(), target)


def teacher_forced(model, b: dict, imgs, drop: torch.Tensor, autocast):
    """Items with their reference summaries teacher-forced -> (embeddings (N, D), summary
    log-probs (N, T), LM mask (N, T)); the rows of `drop` (N,) have no summary and no LM
    loss."""
    with phase("forward"), autocast():
        # two passes of rows of like length: less padding to compute on
        logp, h = model.token_logprobs(b, imgs, groups=2)
    lm_mask = b["gen_mask"] & ~drop.to(logp.device)[:, None]
    return model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def lm_loss(run: Run, logp: torch.Tensor, lm_mask: torch.Tensor) -> torch.Tensor:
    """The summaries' next-token loss: the mean over the global batch's summary tokens."""
    if run.world == 1:
        return -(logp.sum() / lm_mask.sum().clamp(min=1))
    return -logp.sum() * run.world / run.total(lm_mask.sum()).clamp(min=1)   # torchrun


def stage2_loss(args, run: Run, model, pairs: Pairs):
    """InfoNCE over in-batch negatives + lm_weight * next-token loss -> (loss, InfoNCE, LM).
    Summary dropout (ours): a query and its positive often carry the same words, which alone
    could meet InfoNCE; items embedded with no summary make it train perception too."""
    dev = run.device
    b = {k: v.to(dev, non_blocking=True) for k, v in pairs.encoded[0].items()}
    imgs = pairs.encoded[1].to(dev, non_blocking=True)
    drop = torch.tensor(pairs.drop)
    e, logp, lm_mask = teacher_forced(model, b, imgs, drop, run.autocast)
    l_lm = lm_loss(run, logp, lm_mask)
    if pairs.lm_only:                   # stage 0's describe batch: no InfoNCE
        return l_lm, torch.zeros(()), l_lm
    B = pairs.n_queries                 # items: [B queries, their candidates]
    # torchrun: every process's candidates; one process: e[B:] itself
    ec, offset = run.gather(e[B:])
    l_nce = info_nce(e[:B], ec, args.tau, pairs.false_neg.to(dev), target_offset=offset)
    return l_nce + args.lm_weight * l_lm, l_nce, l_lm


def embedding_stage(args, run: Run, source: Source, tok, name: str, steps: int, make_batch,
                    init: Path | None, peak_lr: float):
    """Stages 0-2: per step the global batch from the step's seed, this process's share, the
    loss, the learning rate, the update; a log line and, when due, a checkpoint."""
    model = new_model(args, tok, run.device, init).train()
    opt = adamw(model.parameters(), peak_lr, args.weight_decay, run.device)
    stage = run.stage(name, steps, Retriever(model, tok), opt, dict(source.meta), init)
    if stage is None:
        return
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {n_params:.2f}M parameters, {steps} steps x {args.batch_size} items")
    enc, limit = stage.retriever.enc, stage.retriever.prompt_limit
    batches = run.batches(lambda step: make_batch(args, source.data, step),
                          lambda pairs: pairs.part(run.rank, run.world),   # one process: all
                          lambda pairs: encode_pairs(enc, limit, pairs), stage.start, steps)
    for step in range(stage.start, steps):
        with phase("data"):
            pairs = next(batches)
        # the loss: InfoNCE over in-batch negatives (true matches masked) + next-token loss
        loss, l_nce, l_lm = stage2_loss(args, run, model, pairs)
        # the update: warm-up + cosine lr; gradients averaged over the processes (torchrun;
        # nothing on one), clipped to norm 1; a non-finite step is never applied
        lr = lr_at(step, steps, peak_lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        run.average_gradients(model)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stage.stop_unless_finite(step, loss, gnorm)
        opt.step()
        stage.log(step, {"loss": loss, "infonce": l_nce, "lm": l_lm, "lr": lr,
                         "grad_norm": gnorm, "masked_false_neg": int(pairs.false_neg.sum())})
        stage.save_if_due(step)


def replayed(make, earlier, every: int, args, data_, step: int):
    """Every `every`-th step (0: never) a batch of the earlier stage's kind, from seeds of its
    own (ours): the later stage keeps what the earlier one taught, as the paper's LLM keeps
    its language through LoRA-tuned stages."""
    if every and step % every == every - 1:
        return earlier(args, data_, 10 ** 6 + step)
    return make(args, data_, step)


def describe_stage(args, run: Run, source: Source, tok):
    """Stage 0 (ours, standing in for the MLLM's own pretraining, which the paper starts
    from): the next-token loss of each training image's reference summary, so that the
    model sees its input and describes it before stage 1."""
    embedding_stage(args, run, source, tok, "describe", args.describe_steps,
                    data.make_describe_inputs, None, args.describe_lr)


def text_stage(args, run: Run, source: Source, tok):
    """Stage 1 (Sec. 3.3, after LamRA) in miniature: language-only InfoNCE on NLI triplets
    (data.nli_triplet): premise, entailed rewording (the positive), one-grain contradiction
    (a hard negative); stage 2's model and loss."""
    init = Path(args.out) / "describe" if "describe" in args.stages else None
    make = functools.partial(replayed, data.make_text_inputs, data.make_describe_inputs,
                             args.describe_every if init else 0)
    embedding_stage(args, run, source, tok, "text", args.text_steps, make, init, args.lr)


def contrastive_stage(args, run: Run, source: Source, tok):
    """Stage 2 (Sec. 3.3) on the source's batches, from stage 1's weights when the run has
    it, and then with stage 1's batches replayed every --text_every steps."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    make = functools.partial(replayed, source.contrastive_inputs, data.make_text_inputs,
                             args.text_every if init else 0)
    embedding_stage(args, run, source, tok, "contrastive", args.steps, make, init,
                    args.lr)


# ----------------------------------------------------------------------------------------
# Stage 3: ELVA (Section 3.4). Negatives mined by the stage-2 model, then GRPO.


def make_rl_batch(args, instances, step: int) -> list:
    """Stage 3's global batch: rl_batch instances drawn from the step's seed."""
    return random.Random(f"{args.seed}-rl-batch-{step}").sample(instances, args.rl_batch)


def rollout_seed(args, step: int, rank: int) -> int:
    """The sampling's seed of a step: from the run's seed and the step, another on each
    process."""
    return args.seed * 100003 + step + 7919 * rank


@dataclass
class Rollout:
    """A GRPO rollout batch: B instances x G rollouts x K = 2 + N items (query, positive, N
    negatives) = S sequences in that order; an item's G rollouts share its prompt (U = B * K
    prompts); per sequence, the summary part: summary, [RET]."""
    batch: dict             # prompt_tokens / prompt_attn (U, P), images, index (S,): each row's
                            # prompt; tokens / attn / gen_mask (S, Ts), ret_pos (S,): summary
    sampled: torch.Tensor   # (S, Ts) bool: the tokens the policy sampled (a forced [RET] is not)
    logp: torch.Tensor      # (S, Ts) float32 log-probs of those tokens, with gradient
    e: torch.Tensor         # (B, G, K, D) unit [RET] embeddings: the paper's action
    scores: torch.Tensor    # (B, G, K - 1) cosines of each rollout's query to its candidates
    ranks: torch.Tensor     # (B, G, K - 1) their ranks; the positive's by the reward's rule
    summaries: list         # S sampled summaries (token ids)

    @property
    def shape(self):
        return tuple(self.e.shape[:3])                                          # (B, G, K)


def rollout_index(B: int, G: int, K: int, device) -> torch.Tensor:
    """(S,): row (b, g, k) of a rollout batch continues prompt b * K + k."""
    index = torch.arange(B, device=device)[:, None, None] * K
    index = index + torch.arange(K, device=device)
    return index.expand(B, G, K).reshape(-1)


def rollout_scores(e: torch.Tensor, backend: str = "auto"):
    """e (B, G, K, D) -> each rollout's cosines of its query to its candidates and their
    ranks, the positive's by the reward's rule (B, G, K - 1) each: kernels.cosine_ranks,
    fused on a GPU."""
    B, G, K, D = e.shape
    q, c = e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D)
    s, r = cosine_ranks(q, c, positive_last=True, backend=backend)
    return s.view(B, G, K - 1), r.view(B, G, K - 1)


def on_device(made: Instances, device) -> tuple[dict, torch.Tensor]:
    return {k: v.to(device) for k, v in made.prompts.items()}, made.images.to(device)


def rollout(args, model, made: Instances, gen: torch.Generator, autocast) -> Rollout:
    """The paper's action (Sec. 3.4): per instance and rollout, sample a summary of every
    item -- the query's, the positive's, each negative's -- then embed and score them
    (embed_rollout). Each prompt is read once; its G rollouts expand its KV cache."""
    B, G, K = len(made.batch), args.group_size, 2 + len(made.batch[0][1])
    pb, images = on_device(made, gen.device)       # the U = B * K prompts, left-padded
    index = rollout_index(B, G, K, pb["tokens"].device)                        # (S,)
    with phase("generate"), autocast():
        summ, ended = model.generate(pb["tokens"], pb["attn"], images, index=index,
                                     temperature=args.temperature, generator=gen,
                                     return_ended=True)
    return embed_rollout(args, model, pb, images, (B, G, K), summ, ended, autocast)


def embed_rollout(args, model, pb: dict, images, shape: tuple, summaries, ended, autocast):
    """The sampled summaries teacher-forced after their shared prompts, with gradient (the
    update's log-probs: on-policy, no second pass), embedded at [RET], each rollout's list
    scored and ranked -> Rollout. A [RET] forced after max_summary_len is not `sampled`."""
    B, G, K = shape
    dev = pb["tokens"].device
    index = rollout_index(B, G, K, dev)                                        # (S,)
    sb = elva.collate_summaries(summaries, model.pad_id, model.ret_id)
    sb = {k: v.to(dev) for k, v in sb.items()}
    rb = {"prompt_tokens": pb["tokens"], "prompt_attn": pb["attn"], "images": images,
          "index": index, **sb}
    forced = ~torch.tensor(ended, device=dev)
    sampled = sb["gen_mask"].clone()
    sampled[torch.arange(len(summaries), device=dev)[forced], sb["ret_pos"][forced]] = False
    with phase("forward"), autocast():
        logp, h = model.shared_prefix_logprobs(rb, args.temperature)
    # e keeps its graph: GRPO's loss reaches the embeddings only through the log-probs
    e = model.ret_embedding(h, rb["ret_pos"]).view(B, G, K, -1)      # (B, G, K, D)
    with phase("score"), torch.no_grad():
        scores, ranks = rollout_scores(e.detach())                   # (B, G, K - 1) each
    return Rollout(batch=rb, sampled=sampled, logp=logp.float(), e=e, scores=scores, ranks=ranks,
                   summaries=summaries)


def grpo_step(args, run: Run, stage, ref, made: Instances, gen, step: int) -> dict:
    """ELVA's GRPO step (Section 3.4), in the paper's order: rollout, reward, advantage, loss,
    update. Kept: the clipped objective, the KL to the frozen stage-2 model. Dropped: the
    entropy bonus and the value function (GRPO has none). On-policy (one update per batch)
    the ratio is 1 and the clip never acts: REINFORCE with the group mean as baseline, plus
    the KL; the clip stays so that the objective is GRPO's as written."""
    model, opt = stage.retriever.model, stage.opt
    # 1. rollout
    ro = rollout(args, model, made, gen, run.autocast)
    B, G, K = ro.shape
    # 2. reward, from each rollout's scores and ranks alone
    R, parts = total_reward(ro.scores, args.alpha, args.epsilon, args.delta, args.gamma,
                            return_parts=True, ranks=ro.ranks)                 # (B, G)
    # 3. group advantage, one per rollout, the same for each of its K summaries
    A = group_advantages(R)[:, :, None].expand(B, G, K).reshape(-1)           # (S,)
    # 4. loss: the rollout's own log-probs are the "old" ones; stage 2 is the KL reference
    with phase("reference"), torch.no_grad(), run.autocast():
        ref_logp, _ = ref.model.shared_prefix_logprobs(ro.batch, args.temperature)
    # torchrun: the token count of the whole batch; one process: None (its own)
    n_tokens = run.tokens(ro.sampled, args.loss_norm)
    loss, info = grpo_loss(ro.logp, ro.logp.detach(), ref_logp.float(), A.to(ro.logp.device),
                           ro.sampled, args.clip_eps, args.beta, n_tokens=n_tokens,
                           norm=args.loss_norm)
    # 5. update: gradients averaged over the processes (torchrun; nothing on one), clipped
    # to norm 1; a non-finite step is never applied
    opt.zero_grad(set_to_none=True)
    loss.backward()
    run.average_gradients(model)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    stage.stop_unless_finite(step, loss, gnorm)
    opt.step()
    # the record
    R = R.float()
    tied = (R.max(1).values - R.min(1).values) < 1e-6      # groups with no gradient
    lengths = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32)
    return {"loss": loss.detach(), "reward_mean": R.mean(), "reward_std": R.std(),
            "R_margin": parts["margin"].float().mean(), "R_rank": parts["rank"].float().mean(),
            "top1": (parts["pos_rank"] == 1).float().mean(), "tied_groups": tied.float().mean(),
            "kl": info["kl"], "clip_low": info["clip_low"], "clip_high": info["clip_high"],
            "summary_len": lengths.mean()}


def open_elva_stage(args, run: Run):
    """Stage 3's set-up -> (stage, the frozen stage-2 Retriever, the RL instances), or None if
    --out/<elva_name> is complete. The policy starts as the stage-2 model (--init), which also
    stays frozen as the KL reference and mines the negatives."""
    init = Path(args.init or Path(args.out) / "contrastive")
    ref = Retriever.from_pretrained(init, run.device)
    source = read_source(args, ref.meta)    # stage 2's data; --seed varies only RL here
    model = copy.deepcopy(ref.model).train()
    for p in ref.model.parameters():
        p.requires_grad_(False)
    # the paper freezes the vision encoder and trains the language model (LoRA at 7B; our
    # small decoder is trained whole); --train_vision trains the tower and projector too
    if not args.train_vision:
        for p in model.vision_parameters():
            p.requires_grad_(False)
    if args.compile:
        for blk in [*model.vit, *model.blocks]:
            blk.compile(dynamic=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, args.rl_lr, 0.0, run.device)
    meta = {**source.meta, "init": str(init)}
    stage = run.stage(args.elva_name, args.rl_steps, Retriever(model, ref.tok), opt, meta, init,
                      show=ELVA_SHOWN)
    if stage is None:
        return None
    # the RL instances: queries with balanced negatives mined by the stage-2 model (3.4)
    t0 = time.time()
    instances = mine_instances(args, source, ref, run.autocast)
    if len(instances) < args.rl_batch:
        fail("--rl_batch", args.rl_batch, f"at most the {len(instances)} RL instances mined")
    run.minutes["mining"] = (time.time() - t0) / 60
    C = 1 + args.n_hard + args.n_rand
    gamma = auto_gamma(C) if args.gamma is None else args.gamma
    print(f"{args.elva_name}: mined {len(instances)} instances ({args.n_hard} hard + "
          f"{args.n_rand} random negatives) in {time.time() - t0:.0f}s; {args.rl_steps} steps x "
          f"{args.rl_batch} queries x G={args.group_size}; alpha {args.alpha}, epsilon "
          f"{args.epsilon}, delta {args.delta}, gamma {gamma:.4f} (C = {C}); trains "
          f"{sum(p.numel() for p in trainable) / 1e6:.2f}M parameters")
    return stage, ref, instances


def rl_batches(args, run: Run, stage, instances):
    """The steps' rollout batches: drawn from `instances`, this process's share, prompts
    encoded."""
    enc, limit = stage.retriever.enc, stage.retriever.prompt_limit
    return run.batches(lambda step: make_rl_batch(args, instances, step), run.share,
                       lambda batch: encode_rollout(enc, limit, batch), stage.start,
                       stage.steps)


def elva_stage(args, run: Run):
    """Stage 3: rl_steps GRPO steps from the stage-2 model, each step's sampling seeded."""
    opened = open_elva_stage(args, run)
    if opened is None:
        return
    stage, ref, instances = opened
    batches = rl_batches(args, run, stage, instances)
    gen = torch.Generator(device=run.device)
    for step in range(stage.start, stage.steps):
        # the step's own sampling seed: --resume replays the same samples
        gen.manual_seed(rollout_seed(args, step, run.rank))
        with phase("data"):
            made = next(batches)
        # rollout -> reward -> advantage -> loss -> update
        rec = grpo_step(args, run, stage, ref, made, gen, step)
        stage.log(step, rec)
        stage.save_if_due(step)


# ----------------------------------------------------------------------------------------
# The pipeline


def check_init_data(args):
    """Stage 3 alone trains on its --init checkpoint's data: --mbeir must name the same data."""
    init = Path(args.init or Path(args.out) / "contrastive")
    if not (init / "model.safetensors").is_file():
        return   # the stage's own check names the missing checkpoint
    trained = Retriever.from_pretrained(init, "cpu").meta.get("mbeir")
    root = trained and str(Path(trained["root"]).resolve())
    if root != (args.mbeir and str(Path(args.mbeir).resolve())):
        fail("--mbeir", args.mbeir, f"{trained['root'] if trained else 'none (GrainWorld)'}: "
             f"the data {init} was trained on, which stage 3 continues on")


def evaluate(args, run: Run, eval_tasks: str | None):
    """eval.py on the run's stage-2 and stage-3 checkpoints, in its own process: side by side
    on GrainWorld (eval.json), or with --mbeir one M-BEIR evaluation each
    (eval_<stage>.json)."""
    out = Path(args.out)
    ckpts = [c for c in ("contrastive", args.elva_name)
             if (out / c / "model.safetensors").exists()]
    cmds = [["--out", str(out / "eval.json"), "--queries", str(args.eval_queries),
             "--mrbench_per_task", str(args.mrbench_per_task)]
            + [x for c in ckpts for x in ("--ckpt", str(out / c))]]
    if args.mbeir:
        cmds = [["--ckpt", str(out / c), "--mbeir", args.mbeir, "--tasks", eval_tasks, "--out",
                 str(out / f"eval_{c}.json")] for c in ckpts] if eval_tasks else []
        if not eval_tasks:
            print(f"eval: skipped; {args.mbeir} has no test query file for the training tasks "
                  f"(give --eval_tasks)")
    for cmd in cmds:
        cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), *cmd, "--device",
               str(run.device), "--threads", str(run.threads)]
        print("eval:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def main(argv=None):
    """Stage 1 -> stage 2 -> stage 3 -> evaluation (eval.py, in its own process)."""
    parser = build_parser()
    args = get_args(argv, parser)
    if "contrastive" not in args.stages:   # stage 3 alone trains on --init's data
        check_init_data(args)
    eval_tasks = None
    if args.mbeir:
        import mbeir   # the M-BEIR tasks to evaluate are checked before any training
        eval_tasks = mbeir.eval_tasks(args)
    source = read_source(args) if "contrastive" in args.stages else None   # read, checked
    run = Run(args, SHAPING_ARGS, parser)
    if "contrastive" in args.stages:
        tok = run.tokenizer(source)
        if "describe" in args.stages:
            describe_stage(args, run, source, tok)
        if "text" in args.stages:
            text_stage(args, run, source, tok)
        contrastive_stage(args, run, source, tok)
    if "elva" in args.stages:
        elva_stage(args, run)
    if not args.no_eval and run.rank == 0:
        t0 = time.time()
        evaluate(args, run, eval_tasks)
        run.minutes["eval"] = (time.time() - t0) / 60
    run.finish()


if __name__ == "__main__":
    one_line_errors(main)
