"""
Training, the paper's three stages (ELVA, Sections 3.3-3.4), read top to bottom:
  stage 1  language-only InfoNCE on NLI-style caption triplets (text_stage)
  stage 2  InfoNCE on generated-embedding [RET] states + the summaries' next-token loss (contrastive_stage)
  stage 3  ELVA: balanced negatives mined by the stage-2 model, then GRPO with the margin and ranking rewards and a
           KL to the stage-2 model (elva_stage, grpo_step)

    python train.py                       # default preset (gpu on CUDA, else cpu): stages 1 -> 2 -> 3 -> eval
    python train.py --preset smoke        # the whole pipeline in about a minute on 2 CPU cores
    python train.py --mbeir ROOT --train_tasks mscoco_task0   # stages 2-3 on M-BEIR (python mbeir.py --sample DIR)
    torchrun --nproc_per_node=N train.py  # the same, data-parallel over N processes (GPUs, or CPU with gloo)

This file is the paper only. Our variants, the equal-compute control and the study's runs live in study.py, which
calls these functions with other arguments (each step a variant may change is a function argument here whose
default is the paper's). Run machinery (flag checks, logging, checkpoints, torchrun, --profile) is in runtime.py,
which a reader of the paper may skip; real data in mbeir.py.

Outputs under --out (default runs/<preset>): run.json, tokenizer.json, a checkpoint folder per stage (weights, optimizer
state, tokenizer, config.json naming them with their hashes), log.jsonl per stage, eval.json from `python eval.py`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import elva
import mbeir
from data import INSTRUCTIONS, TASKS, GrainWorld, Source, WorldConfig
from kernels import cosine_ranks
from reward import ALPHA, DEFAULT_DELTA, EPSILON, RewardConfig, group_advantages, grpo_loss
from runtime import (Logger, Profiler, add_run_flags, barrier, build_tokenizer, check_run_folder, check_updates,
                     compile_blocks, evaluate_run, fail, gather, global_tokens, init_distributed, later_steps, lr_at,
                     my_share, my_share_of_items, optimizer_step, phase, rank_of, resolve_stage_args, resume_point,
                     rollout_diagnostics, save, serializable, set_threads, step_inputs, world_of)

# ----------------------------------------------------------------------------------------------------------------------
# Presets: the sizes of the world and of each stage (the model's sizes live in elva.PRESETS). Keys without a flag here
# (n_train, rl_queries, ...) are set by study.py's flags.

TRAIN_PRESETS = {
    "smoke": dict(n_train=400, n_test=60, text_steps=10, steps=40, batch_size=16, lr=2e-3, rl_steps=6, rl_batch=2,
                  group_size=4, n_hard=2, n_rand=2, rl_queries=8, rl_pool_scenes=40, eval_queries=20,
                  mrbench_per_task=6, log_every=5),
    "cpu": dict(n_train=6000, n_test=500, text_steps=300, steps=1000, batch_size=48, lr=1e-3, rl_steps=150,
                rl_batch=2, group_size=8, n_hard=4, n_rand=4, rl_queries=200, rl_pool_scenes=300, eval_queries=200,
                mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, text_steps=1000, steps=6000, batch_size=128, lr=5e-4, rl_steps=400,
                rl_batch=8, group_size=8, n_hard=16, n_rand=16, rl_queries=1000, rl_pool_scenes=1500,
                eval_queries=250, mrbench_per_task=250, log_every=50),
}
# Shared by every preset: AdamW's weight decay and warm-up, one GRPO update per batch (on-policy), stage 3's folder.
COMMON = dict(weight_decay=0.05, warmup=0.05, num_iterations=1, elva_name="elva")
# The arguments the run's first line shows (each checkpoint's config.json saves them all).
SHOWN_ARGS = ("preset", "out", "seed", "stages", "device", "steps", "rl_steps", "rl_lr", "beta", "mbeir")
# The arguments that decide the world, the tokenizer and the model's shape: a run folder keeps one value of each.
SHAPING_ARGS = ("preset", "seed", "n_train", "n_test", "vocab_size", "mbeir", "train_tasks", "mbeir_pool",
                "summary_field")


def build_parser() -> argparse.ArgumentParser:
    """The paper's knobs and the run's essentials, one flag each (study.py adds its variants to this parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument_group("run").add_argument
    add("--preset", default=None, choices=list(TRAIN_PRESETS), help="sizes; default gpu on CUDA, else cpu")
    add("--out", default=None, help="output folder (default runs/<preset>)")
    add("--seed", type=int, default=0, help="seed for the world, the model and the sampling")
    add("--stages", default=None, help="text, contrastive, elva: stages 1-3 (default all three; 2-3 with --mbeir)")
    add_run_flags(p)   # --resume, --device, --threads, --log_every, --profile, ... (runtime.py)
    add = p.add_argument_group("data: GrainWorld, or M-BEIR in UniIR's layout with --mbeir").add_argument
    add("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    mbeir.add_train_flags(add)   # --mbeir ROOT, --train_tasks, ...
    add = p.add_argument_group("stage 1: text (Sec. 3.3); batch, lr, tau, dropout: stage 2's").add_argument
    add("--text_steps", type=int, default=None, help="optimizer steps of the text stage")
    add = p.add_argument_group("stage 2: contrastive (Sec. 3.3)").add_argument
    add("--steps", type=int, default=None, help="optimizer steps")
    add("--batch_size", type=int, default=None, help="queries per step (each with its positive)")
    add("--lr", type=float, default=None, help="peak AdamW learning rate")
    add("--tau", type=float, default=0.05, help="InfoNCE temperature")
    add("--lm_weight", type=float, default=1.0, help="weight of the next-token loss on summaries")
    add("--summary_dropout", type=float, default=0.5, help="items embedded with an empty summary (ours; stage2_loss)")
    add = p.add_argument_group("stage 3: ELVA (Sec. 3.4)").add_argument
    add("--init", default=None, help="start checkpoint (default <out>/contrastive, the stage-2 model)")
    add("--rl_steps", type=int, default=None, help="optimizer steps")
    add("--rl_batch", type=int, default=None, help="queries per step")
    add("--group_size", type=int, default=None, help="G: rollouts per query (paper 8)")
    add("--n_hard", type=int, default=None, help="filtered hard negatives per query (paper 50)")
    add("--n_rand", type=int, default=None, help="random negatives per query (paper 50)")
    add("--hard_threshold", type=float, default=0.95, help="drop candidates above this stage-2 cosine from the hard "
        "negatives: likely false negatives (paper: not given)")
    add("--rl_lr", type=float, default=1e-5, help="AdamW learning rate (paper 1e-6 for 7B + LoRA)")
    add("--temperature", type=float, default=1.0, help="sampling temperature of rollout summaries (paper: not given)")
    add("--clip_eps", type=float, default=0.2, help="PPO clip range of the ratio (TRL's --epsilon; paper: not given)")
    add("--beta", type=float, default=0.2, help="KL coefficient to the reference model (paper 0.2)")
    add("--alpha", "--margin_weight", dest="alpha", type=float, default=ALPHA, help="weight of R_Margin (paper 0.4)")
    add("--epsilon", "--rank_weight", dest="epsilon", type=float, default=EPSILON, help="weight of R_Rank in R_total "
        "(paper 0.6; 0 ablates it; not TRL's --epsilon, which is --clip_eps here)")
    add("--delta", type=float, default=DEFAULT_DELTA, help="margin of R_Margin (paper: not given)")
    add("--gamma", default="auto", help="weight of R_Rank's negative term: auto (reward.auto_gamma) or a number")
    add("--train_vision", action="store_true", help="train the vision tower too (the paper freezes it)")
    add("--loss_norm", default="token", choices=["token", "sequence"], help="GRPO's mean (reward.grpo_loss)")
    return p


def get_args(argv=None, parser=None):
    """Parse (train.py's flags, or study.py's superset), fill the preset's values, check every flag."""
    args = resolve_stage_args((parser or build_parser()).parse_args(argv), TRAIN_PRESETS, COMMON, len(TASKS))
    args.reward_cfg = RewardConfig(args.alpha, args.epsilon, args.delta, args.gamma)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The data, behind one interface (data.Source): GrainWorld here, M-BEIR in mbeir.py


def grainworld_source(cfg: WorldConfig) -> Source:
    world = GrainWorld(cfg)
    return Source(world, {"world": cfg.__dict__}, functools.partial(data.world_corpus, world, seed=cfg.seed),
                  make_stage2_inputs, build_rl_instances,
                  f"world: {len(world.splits['train'])} train / {len(world.splits['test'])} test scenes")


def read_source(args, meta: dict | None = None) -> Source:
    """The training data, read and checked whole before any work: from the flags, or (stage 3) from the stage-2
    checkpoint's config.json, so that ELVA mines and trains on the data stage 2 saw."""
    if meta is None:
        size = elva.PRESETS[args.preset].image_size
        meta = mbeir.meta_of(args) if args.mbeir else {"world": WorldConfig(args.seed, args.n_train, n_test=args.n_test,
                                                                            image_size=size).__dict__}
    if isinstance(meta.get("mbeir"), dict):
        return mbeir.training_source(meta["mbeir"])
    if isinstance(meta.get("world"), dict):
        return grainworld_source(WorldConfig(**meta["world"]))
    fail("--init", args.init, "a stage-2 checkpoint whose config.json has a 'world' (or 'mbeir') section")


# ----------------------------------------------------------------------------------------------------------------------
# Stages 1 and 2 (Section 3.3): InfoNCE on [RET] embeddings of teacher-forced reference summaries, plus the summaries'
# next-token loss that teaches our from-scratch model to write summaries at all (Qwen2-VL already can).


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg: torch.Tensor | None = None,
             target_offset: int = 0):
    """L = -1/N sum_n log( exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau) )   (ELVA, Section 3.3).

    eq (N, D), ec (M, D) or (N, M, D), unit vectors. With ec (M, D), candidate n (+ target_offset, when candidates
    are gathered from several processes) is query n's positive; with ec (N, M, D), candidate 0 of each row is.
    false_neg (N, M) masks candidates known to be relevant, so a true match is never pushed away as a negative."""
    if ec.dim() == 2:
        logits = eq @ ec.T / tau                                               # (N, M)
        target = torch.arange(eq.shape[0], device=eq.device) + target_offset
    else:
        logits = torch.einsum("nd,nmd->nm", eq, ec) / tau                      # (N, M)
        target = torch.zeros(eq.shape[0], dtype=torch.long, device=eq.device)
    if false_neg is not None:
        logits = logits.masked_fill(false_neg, float("-inf"))
    return F.cross_entropy(logits.float(), target)


def teacher_forced_on(model, b: dict, imgs: torch.Tensor, drop: torch.Tensor, autocast):
    """An encoded batch (on the model's device) with its reference summaries teacher-forced -> (embeddings (N, D),
    summary-token log-probs (N, T), LM mask (N, T)). drop (N,) bool: rows embedded with an empty summary, out of
    the LM loss (summary dropout)."""
    with phase("forward"), autocast():
        logp, h = model.token_logprobs(b, imgs, groups=2)   # two passes of similar length: less padding
    lm_mask = b["gen_mask"] & ~drop.to(logp.device)[:, None]
    return model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def lm_loss(logp: torch.Tensor, lm_mask: torch.Tensor, args) -> torch.Tensor:
    """The summaries' next-token loss, a mean over tokens; under torchrun over the whole batch's tokens."""
    if world_of(args) > 1:
        n_tok = lm_mask.sum().float()
        dist.all_reduce(n_tok)
        return -logp.sum() * world_of(args) / n_tok.clamp(min=1)
    return -logp.sum() / lm_mask.sum().clamp(min=1)


def stage2_loss(args, retriever, inputs: dict, autocast, device):
    """Stages 1-2's loss on one step's inputs: InfoNCE over in-batch negatives + lm_weight * next-token loss.
    -> (loss, InfoNCE, LM loss). Items are laid out as [B queries, then the candidates: their B positives first, then
    any extra negatives]; under torchrun the candidates are gathered from every process (gradients flow back).

    Summary dropout (ours): with teacher-forced reference summaries a query and its positive often carry
    near-identical text (for i2i the same string), so InfoNCE could be met by reading the summary alone. Dropping the
    summary of a random part of the items makes InfoNCE train perception too; the LM loss teaches every kept summary."""
    b, imgs = retriever.on_device(*inputs["encoded"])
    e, logp, lm_mask = teacher_forced_on(retriever.model, b, imgs, torch.tensor(inputs["drop"]), autocast)
    B = inputs["n_queries"]
    ec = gather(e[B:], args)                                                    # (world * candidates, D)
    l_nce = info_nce(e[:B], ec, args.tau, inputs["false_neg"].to(device),
                     target_offset=rank_of(args) * (e.shape[0] - B))
    l_lm = lm_loss(logp, lm_mask, args)
    return l_nce + args.lm_weight * l_lm, l_nce, l_lm


def make_text_inputs(args, world, enc, limit, step: int) -> dict:
    """Stage 1's step without the model: B (scene, premise, entailed rewording, one-grain contradiction) triplets
    from the step's seed (so --resume and any number of DataLoader workers replay the same batch), this process's
    share, the dropout flags, the mask of candidates the query's scene satisfies, and the encoded tensors (CPU)."""
    rng = random.Random(f"{args.seed}-text-{step}")
    scenes, triplets = [], []
    while len(triplets) < args.batch_size:
        s = rng.choice(world.splits["train"])
        t = data.nli_triplet(rng, s)
        if t is not None:
            scenes.append(s)
            triplets.append(t)
    all_triplets = triplets
    # this process's share; the candidates, gathered over processes, come as [its entailed, its contradictions]
    scenes, triplets = my_share(scenes, args), my_share(triplets, args)
    drop = my_share_of_items([rng.random() < args.summary_dropout for _ in range(3 * args.batch_size)], args, 3)
    b = len(triplets)
    cols = [c for r in range(world_of(args)) for k in (1, 2) for c in [t[k] for t in my_share(all_triplets, args, r)]]
    caps = [t[0] for t in triplets] + [t[1] for t in triplets] + [t[2] for t in triplets]
    items = [data.Item(text=c.text(), summary=c.summary(), caption=c) for c in caps]
    false_neg = torch.tensor([[j != rank_of(args) * 2 * b + i and data.satisfies(s, c) for j, c in enumerate(cols)]
                              for i, s in enumerate(scenes)])                                 # (b, 2B)
    return {"encoded": data.encode_batch(enc, items, [None] * len(items), enc.reference_summaries(items, drop), limit),
            "drop": drop, "false_neg": false_neg, "n_queries": b}


def in_batch_false_negatives(queries) -> torch.Tensor:
    """(B, B) bool: query j's positive is relevant to query i too (candidates carry no instruction: any task's)."""
    return torch.tensor([[i != j and data.relevant(qi.task, qi.item, qj.positive) for j, qj in enumerate(queries)]
                         for i, qi in enumerate(queries)], dtype=torch.bool)


def make_stage2_inputs(args, world, enc, limit, step: int) -> dict:
    """Stage 2's step without the model: B queries over the four tasks and their positives from the step's seed, this
    process's share, dropout flags, the false-negative mask and the encoded tensors (items/instr: study.py's use)."""
    rng = random.Random(f"{args.seed}-contrastive-{step}")
    queries = world.sample_queries(rng, args.batch_size)                       # the global batch
    drop = my_share_of_items([rng.random() < args.summary_dropout for _ in range(2 * len(queries))], args, 2)
    mine = my_share(queries, args)
    items = [q.item for q in mine] + [q.positive for q in mine]
    instr = [INSTRUCTIONS[q.task] for q in mine] + [None] * len(mine)
    return {"encoded": data.encode_batch(enc, items, instr, enc.reference_summaries(items, drop), limit),
            "drop": drop, "false_neg": my_share(in_batch_false_negatives(queries), args), "n_queries": len(mine),
            "items": items, "instr": instr}


def embedding_stage(args, source: Source, tok, device, autocast, name: str, steps: int, make_inputs,
                    init: Path | None, what: str, loss_fn=stage2_loss):
    """The loop of stages 1 and 2: a fresh model (or `init`'s weights), then per step: the batch -> the loss ->
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
    logger = Logger(folder, name, steps, start, args.log_every, rank_of(args) == 0, later=later_steps(args, name))
    prof = Profiler(args.profile, name, start, steps)
    meta = {**source.meta, "args": serializable(args), "stage": name}
    model.train()
    inputs = step_inputs(args, functools.partial(make_inputs, args, source.data, retriever.enc,
                                                 retriever.prompt_limit), start, steps, device)
    for step in range(start, steps):
        prof.step_begins(step)
        # the batch, made ahead from the step's seed
        with phase("data"):
            batch = next(inputs)
        # the loss: InfoNCE over in-batch negatives (true matches masked) + the summaries' next-token loss
        loss, l_nce, l_lm = loss_fn(args, retriever, batch, autocast, device)
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


def text_stage(args, source: Source, tok, device, autocast):
    """Stage 1 (Sec. 3.3, after LamRA) in miniature: language-only InfoNCE on NLI-style triplets (data.nli_triplet):
    a caption of a training scene, an entailed rewording (positive), the caption with one grain contradicted (hard
    negative), plus in-batch negatives. Same model, template, summaries and dropout as stage 2; no images."""
    embedding_stage(args, source, tok, device, autocast, "text", args.text_steps, make_text_inputs, None,
                    "NLI triplets")


def contrastive_stage(args, source: Source, tok, device, autocast, make_inputs=None, loss_fn=stage2_loss):
    """Stage 2 (Sec. 3.3): InfoNCE over in-batch negatives + the summaries' next-token loss, from stage 1's weights
    when this run has the text stage. make_inputs: the source's batch maker (GrainWorld's or M-BEIR's)."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    embedding_stage(args, source, tok, device, autocast, "contrastive", args.steps,
                    make_inputs or source.contrastive_inputs, init, "queries", loss_fn)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: ELVA (Section 3.4). Balanced negatives mined with the stage-2 model, then GRPO over generated embeddings.


def build_rl_instances(args, world, retriever, autocast):
    """Per task, rl_queries RL queries on training scenes, each with its positive and n_hard filtered hard + n_rand
    random negatives mined from a pool of train scenes and their one-grain siblings (Section 3.4, negative sampling:
    hard negatives alone make the rewards of a group alike and the advantages vanish)."""
    rng = random.Random(f"{args.seed}-rl-data")
    gen = torch.Generator().manual_seed(args.seed)
    instances = []
    for task in TASKS:
        pool = world.rl_pool(task, args.rl_pool_scenes, rng)
        queries = []
        while len(queries) < args.rl_queries:
            q = data.make_query(task, rng, rng.choice(pool).scene if task != "i2t" else
                                rng.choice(world.splits["train"]))
            if q is not None and q.item.target not in world.outside("train"):
                queries.append(q)
        rel = torch.tensor([[data.relevant(task, q.item, c) for c in pool] for q in queries])   # (Q, P) exact
        neg = data.mine_negatives(retriever, [q.item for q in queries], [INSTRUCTIONS[task]] * len(queries), pool,
                                  rel, args.n_hard, args.n_rand, args.hard_threshold, gen, autocast)   # (Q, N)
        for q, idx in zip(queries, neg.tolist()):
            instances.append((q, [pool[i] for i in idx]))
    return instances


def instruction_of(q: data.Query) -> str:   # its own (real data) or its task's (GrainWorld)
    return q.instruction if q.instruction is not None else INSTRUCTIONS[q.task]


def rollout_items(batch, G: int = 1):
    """The items of a rollout batch in (instance, rollout, item) order and their instructions: the query gets its
    task's instruction, candidates none (as in M-BEIR's pools). G = 1: each item once (the shared prompts)."""
    items, instr = [], []
    for q, negs in batch:
        for _ in range(G):
            items += [q.item, q.positive, *negs]
            instr += [instruction_of(q)] + [None] * (1 + len(negs))
    return items, instr


def make_rl_inputs(args, instances, enc, limit, step: int) -> dict:
    """Stage 3's step without the model (a DataLoader worker can make it ahead): rl_batch instances drawn from the
    step's seed (so --resume replays them), this process's share, and its items' prompts encoded (no summaries)."""
    rng = random.Random(f"{args.seed}-rl-batch-{step}")
    batch = my_share(rng.sample(instances, args.rl_batch), args)       # the global batch, then this share
    return {"batch": batch, "encoded": data.encode_batch(enc, *rollout_items(batch), None, limit)}


@dataclass
class Rollout:
    """One GRPO rollout batch: B instances x G rollouts x K = 2 + N items (query, positive, N negatives), that is
    S = B * G * K sequences in (instance, rollout, item) order. The G rollouts of an item share its prompt, held once
    (U = B * K prompts); the per-sequence tensors cover the summary part: the summary, then [RET]."""
    batch: dict               # prompt_tokens / prompt_attn (U, P), images, index (S,): the prompt of each sequence;
                              # tokens / attn / gen_mask (S, Ts) and ret_pos (S,): the summary part
    sampled: torch.Tensor     # (S, Ts) bool: the tokens the policy sampled -- the summary, and [RET] unless forced
    logp: torch.Tensor        # (S, Ts) float32 log-probs of those tokens under the policy, with gradient
    h: torch.Tensor           # (S, Ts, D) final hidden states of the summary part, with gradient
    e: torch.Tensor           # (B, G, K, D) unit [RET] embeddings, no gradient
    scores: torch.Tensor      # (B, G, K - 1) cosine of each rollout's query to its positive (0) and negatives
    ranks: torch.Tensor | None = None               # (B, G, K - 1) their ranks, the positive's by the reward's rule
    summaries: list = field(default_factory=list)   # S sampled summaries (token ids)
    ended: list = field(default_factory=list)       # S bools: the summary sampled its [RET] (False: forced)
    queries: list = field(default_factory=list)     # the B instances' Query objects
    negatives: list = field(default_factory=list)   # the B instances' negative Items

    @property
    def shape(self):
        return tuple(self.e.shape[:3])                                          # (B, G, K)


def rollout_scores(e: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """e (B, G, K, D): per rollout the query then its K - 1 candidates -> cosine scores and ranks (B, G, K - 1), the
    positive's by the reward's rule: one fused Triton kernel on a GPU (kernels.cosine_ranks), its reference on CPU."""
    B, G, K, D = e.shape
    s, r = cosine_ranks(e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D), True, backend)
    return s.view(B, G, K - 1), r.view(B, G, K - 1)


def sample_all(args, policy, pb, images, index, gen, K):
    """The paper's action: every summary of every rollout -- the query's, the positive's, each negative's -- sampled
    at --temperature. -> (summaries, ended, fixed (S,) bool: rows not sampled, none here)."""
    summ, ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=args.temperature,
                                        generator=gen, return_ended=True, index=index)
    return summ, ended, torch.zeros(len(index), dtype=torch.bool, device=index.device)


def rollout(args, policy: elva.Retriever, batch, gen: torch.Generator, autocast, encoded=None,
            sample=sample_all) -> Rollout:
    """For each of B instances and each of G rollouts, sample the summaries (`sample`), embed every item at [RET]
    and score each rollout's candidates against its query. Each item's prompt is read once and shared by its G
    rollouts (generation and the teacher-forced pass expand its KV cache); the teacher-forced pass runs with
    gradient, so its log-probs serve the first policy update too (no second forward)."""
    B, G, K = len(batch), args.group_size, 2 + len(batch[0][1])
    with phase("data"):   # prompts (U, P) of the U = B * K unique items, left-padded; made ahead when `encoded`
        pb, images = policy.batch(*rollout_items(batch), None) if encoded is None else policy.on_device(*encoded)
    dev = pb["tokens"].device
    # row (b, g, k) continues prompt b * K + k
    index = (torch.arange(B, device=dev)[:, None, None] * K + torch.arange(K, device=dev)).expand(B, G, K).reshape(-1)
    with phase("generate"), autocast():
        summ, ended, fixed = sample(args, policy, pb, images, index, gen, K)
    sb = {k: v.to(dev) for k, v in data.collate_summaries(summ, policy.enc.pad, policy.enc.ret).items()}
    rb = {"prompt_tokens": pb["tokens"], "prompt_attn": pb["attn"], "images": images, "index": index, **sb}
    # a [RET] appended after max_summary_len tokens was not sampled: it gets no advantage and no KL
    forced = ~torch.tensor(ended, device=dev)
    sampled = sb["gen_mask"].clone()
    sampled[torch.arange(len(summ), device=dev)[forced], sb["ret_pos"][forced]] = False
    sampled[fixed] = False
    with phase("forward"), autocast():
        logp, h = policy.model.shared_prefix_logprobs(rb, args.temperature)
    with phase("score"), torch.no_grad():
        e = policy.model.ret_embedding(h, sb["ret_pos"]).view(B, G, K, -1)        # (B, G, K, D)
        scores, ranks = rollout_scores(e)                                           # (B, G, K - 1) each
    return Rollout(rb, sampled, logp.float(), h, e, scores, ranks, summ, ended, *map(list, zip(*batch)))


def paper_reward(args, ro: Rollout, policy) -> tuple[torch.Tensor, dict]:
    """R_total = alpha R_Margin + epsilon R_Rank of each rollout's list (Section 3.4) -> (B, G), on the device."""
    return args.reward_cfg(ro.scores, return_parts=True, ranks=ro.ranks)


def rollout_advantages(args, ro: Rollout, R: torch.Tensor) -> torch.Tensor:
    """GRPO's group advantage (R - mean) / (std + eps) over a query's G rollouts, shared by each of the rollout's K
    summaries. -> (S,) in (instance, rollout, item) order."""
    B, G, K = ro.shape
    return group_advantages(R)[:, :, None].expand(B, G, K).reshape(-1)        # (B, G) -> (S,)


def grpo_step(args, policy, ref: elva.Retriever, opt, made: dict, gen, autocast, step, folder: Path,
              sample=sample_all, reward=paper_reward, advantages=rollout_advantages, extra_losses=()) -> dict:
    """ELVA's GRPO step (Section 3.4), in the paper's order:
      1. rollout     G sampled summaries of every item -> [RET] embeddings -> each rollout's ranked candidate list
      2. reward      R_total = alpha R_Margin + epsilon R_Rank of each rollout's list, without gradient
      3. advantage   A = (R - mean) / (std + eps) over the query's G rollouts, shared by all the rollout's summaries
      4. loss        PPO-clipped policy gradient on the sampled summary tokens + beta * KL(k3) to the stage-2 model
      5. update      clipped AdamW step
    Kept: clipping, KL to the frozen stage-2 model. Dropped: entropy bonus, value function (GRPO has none).
    sample / reward / advantages / extra_losses default to the paper's steps; study.py passes its variants here."""
    # 1. rollout
    ro = rollout(args, policy, made["batch"], gen, autocast, made["encoded"], sample)
    # 2. reward, from the scores alone
    R, parts = reward(args, ro, policy)                                        # (B, G)
    # 3. group advantage, one per rollout, the same for each of its K summaries
    A_seq = advantages(args, ro, R).to(ro.logp.device)                         # (S,)
    # 4. loss: the rollout policy's log-probs are the "old" ones; the frozen stage-2 model is the KL reference
    old_logp = ro.logp.detach()
    with phase("reference"), torch.no_grad(), autocast():
        ref_logp, ref_h = ref.model.shared_prefix_logprobs(ro.batch, args.temperature)
        e_ref = ref.model.ret_embedding(ref_h, ro.batch["ret_pos"])           # (S, D): the stage-2 map, same words
    logp, h = ro.logp, ro.h                                                    # on-policy: ratio exactly 1
    n_tokens = global_tokens(ro.sampled, args, args.loss_norm)                 # None without torchrun
    for it in range(args.num_iterations):
        if it > 0:   # a further update on the same rollouts (PPO-style reuse; the ratio now differs from 1)
            with autocast():
                logp, h = policy.model.shared_prefix_logprobs(ro.batch, args.temperature)
        loss, info = grpo_loss(logp.float(), old_logp, ref_logp.float(), A_seq, ro.sampled, args.clip_eps, args.beta,
                               n_tokens=n_tokens, norm=args.loss_norm)
        for term in extra_losses:   # none in the paper
            loss = loss + term(args, ro, policy, h, e_ref)
        # 5. update
        optimizer_step(opt, policy.model, loss, step, "elva", folder, args)
    return {"loss": loss.item(), **rollout_diagnostics(args, ro, R, parts, A_seq, info, policy, e_ref)}


def elva_stage(args, device, autocast, step_fn=grpo_step):
    """Stage 3: the policy starts as the stage-2 model (--init), which also stays frozen as the KL reference and mines
    the negatives; then rl_steps GRPO steps (step_fn: the paper's grpo_step; study.py passes its variants here)."""
    init = Path(args.init or Path(args.out) / "contrastive")
    folder = Path(args.out) / args.elva_name
    ref = elva.Retriever.from_pretrained(init, device)   # the frozen stage-2 model: KL anchor and negative miner
    source = read_source(args, ref.meta)                 # the stage-2 model's data; --seed varies only RL here
    model = copy.deepcopy(ref.model).train()
    for p in ref.model.parameters():
        p.requires_grad_(False)
    # the paper freezes the vision encoder and trains the language model (with LoRA at 7B; our decoder is small
    # enough to train whole): the vision tower and projector stay as stage 2 left them unless --train_vision
    if not args.train_vision:
        for p in model.vision_parameters():
            p.requires_grad_(False)
    compile_blocks(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.rl_lr, weight_decay=0.0, betas=(0.9, 0.98), fused=device.type == "cuda")
    start = resume_point(args, folder, model, opt, args.elva_name, device)
    if start >= args.rl_steps:
        print(f"{args.elva_name}: already complete ({args.rl_steps} steps) in {folder}")
        return
    # the RL instances: queries with balanced negatives mined by the stage-2 model (Section 3.4)
    t0 = time.time()
    instances = source.rl_instances(args, source.data, ref, autocast)
    C = 1 + args.n_hard + args.n_rand
    print(f"{args.elva_name}: mined {len(instances)} RL instances ({args.n_hard} hard + {args.n_rand} random "
          f"negatives each) in {time.time() - t0:.0f}s; {args.rl_steps} steps x {args.rl_batch} queries x "
          f"G={args.group_size}; alpha {args.alpha}, epsilon {args.epsilon}, delta {args.delta}, gamma "
          f"{args.reward_cfg.gamma_for(C):.4f}{' (auto for C = %d)' % C if args.gamma is None else ''}; trains "
          f"{sum(p.numel() for p in trainable) / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters{' (vision frozen)' if not args.train_vision else ''}")
    policy = elva.Retriever(model, ref.tok)
    logger = Logger(folder, args.elva_name, args.rl_steps, start, args.log_every, rank_of(args) == 0, show=(
        "loss", "reward_mean", "R_rank", "top1", "tied_groups", "kl", "summary_len", "cos_pos", "infonce", "lm"))
    meta = {**source.meta, "args": serializable(args), "stage": "elva", "init": str(init)}
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
        # rollout -> reward -> advantage -> loss -> update
        rec = step_fn(args, policy, ref, opt, made, gen, autocast, step, folder)
        logger.log(step, rec, args)
        if step % args.log_every == 0:
            check_updates(opt, args.elva_name, folder)
        prof.step_ends(step)
        if (step + 1) % args.ckpt_every == 0 or step == args.rl_steps - 1:
            save(folder, model, ref.tok, meta, opt, step, args.elva_name, args)
    print(f"{args.elva_name}: saved {folder} ({time.time() - t0:.0f}s)")


def main(argv=None, args=None, contrastive_inputs=None, contrastive_loss=stage2_loss, elva_step=grpo_step):
    """The pipeline: stage 1 -> stage 2 -> stage 3 -> evaluation. study.py calls it with its arguments (args) and
    variants (a stage-2 batch maker and loss, a stage-3 step); the defaults are the paper's."""
    args = args or get_args(argv)
    init_distributed(args)
    threads = set_threads(args)
    device, autocast = elva.resolve_device(args.device)
    if args.rank == 0:
        check_run_folder(args, SHAPING_ARGS)
    barrier(args)
    torch.manual_seed(args.seed)
    print("args:", " ".join(f"--{k} {','.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
                            if k in SHOWN_ARGS and v is not None), f"(all: {args.out}/<stage>/config.json)")
    t0 = time.time()
    if "contrastive" in args.stages:
        source = read_source(args)
        if args.rank == 0:
            build_tokenizer(args, source.texts)
        barrier(args)
        tok = build_tokenizer(args, source.texts)   # the first process trained and wrote it
        print(f"{source.describe} | tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)")
        if "text" in args.stages:
            text_stage(args, source, tok, device, autocast)
        contrastive_stage(args, source, tok, device, autocast, contrastive_inputs, contrastive_loss)
    if "elva" in args.stages:
        elva_stage(args, device, autocast, elva_step)
    if not args.no_eval and args.rank == 0:   # eval.py in its own process, on this run's checkpoints
        (mbeir.evaluate_mbeir_run if args.mbeir else evaluate_run)(args, Path(args.out), device, threads)
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    if args.world_size > 1:
        barrier(args)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
