"""
Training, the paper's three stages (ELVA, Sections 3.3-3.4), read top to bottom:
  stage 1  language-only InfoNCE on NLI-style caption triplets (text_stage)
  stage 2  InfoNCE on generated-embedding [RET] states + the summaries' next-token loss (contrastive_stage)
  stage 3  ELVA: balanced negatives mined by the stage-2 model, then GRPO with the margin and ranking rewards
           and a KL to the stage-2 model (elva_stage: rollout, grpo_step)

    python train.py                       # default preset (gpu on CUDA, else cpu): stages 1 -> 2 -> 3 -> eval
    python train.py --preset smoke        # the whole pipeline in under a minute on 2 CPU cores
    python train.py --mbeir ROOT --train_tasks mscoco_task0   # stages 2-3 on M-BEIR (python mbeir.py --sample)
    torchrun --nproc_per_node=N train.py  # the same, data-parallel over N processes (GPUs, or CPU with gloo)

This file is the paper only. Our variants, the equal-compute control and the study's runs live in
study.py, which builds its own steps from the pieces here. Run machinery (flag checks, the stage
loop, logging, checkpoints, torchrun, --profile) is in runtime.py, which a reader of the paper may
skip; real data in mbeir.py.

Outputs under --out (default runs/<preset>): run.json, tokenizer.json, a checkpoint folder per stage
(weights, optimizer state, tokenizer, config.json naming them with their hashes), log.jsonl per
stage, eval.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import elva
from data import INSTRUCTIONS, TASKS, GrainWorld, Source, WorldConfig
from kernels import cosine_ranks
from reward import ALPHA, DEFAULT_DELTA, EPSILON, auto_gamma, group_advantages, grpo_loss, total_reward
from runtime import (adamw, add_run_flags, barrier, batch_mean, build_tokenizer, check_run_folder,
                     compile_blocks, evaluate_run, fail, gather_candidates, global_tokens, init_distributed,
                     lr_at, my_part, my_share, open_stage, optimizer_step, phase, resolve_device,
                     resolve_stage_args, run_steps, serializable, set_lr, set_threads, step_inputs)


# --------------------------------------------------------------------------------------------------
# Presets: the sizes of the world and of each stage (the model's sizes live in elva.PRESETS). Keys
# without a flag here (n_train, rl_queries, ...) are set by study.py's flags.

TRAIN_PRESETS = {
    "smoke": dict(n_train=400, n_test=60, text_steps=10, steps=40, batch_size=16, lr=2e-3, rl_steps=6,
                  rl_batch=2, group_size=4, n_hard=2, n_rand=2, rl_queries=8, rl_pool_scenes=40,
                  eval_queries=20, mrbench_per_task=6, log_every=5),
    "cpu": dict(n_train=6000, n_test=500, text_steps=300, steps=1000, batch_size=48, lr=1e-3, rl_steps=150,
                rl_batch=2, group_size=8, n_hard=4, n_rand=4, rl_queries=200, rl_pool_scenes=300,
                eval_queries=200, mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, text_steps=1000, steps=6000, batch_size=128, lr=5e-4, rl_steps=400,
                rl_batch=8, group_size=8, n_hard=16, n_rand=16, rl_queries=1000, rl_pool_scenes=1500,
                eval_queries=250, mrbench_per_task=250, log_every=50),
}
# Shared by every preset: AdamW's weight decay and warm-up, one GRPO update per batch (on-policy),
# stage 3's folder.
COMMON = dict(weight_decay=0.05, warmup=0.05, num_iterations=1, elva_name="elva")
# The arguments the run's first line shows (each checkpoint's config.json saves them all).
SHOWN_ARGS = ("preset", "out", "seed", "stages", "device", "steps", "rl_steps", "rl_lr", "beta", "mbeir")
# The arguments that decide the world, the tokenizer and the model's shape: a run folder keeps one
# value of each.
SHAPING_ARGS = ("preset", "seed", "world_seed", "n_train", "n_test", "vocab_size", "mbeir", "train_tasks",
                "mbeir_pool", "summary_field")
# What stage 3's console line shows (its log.jsonl keeps every value of the step).
ELVA_SHOWN = ("loss", "reward_mean", "R_rank", "top1", "tied_groups", "kl", "summary_len")


def build_parser() -> argparse.ArgumentParser:
    """The paper's knobs and the run's essentials, one flag each (study.py adds its variants to
    this parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument_group("run").add_argument
    add("--preset", default=None, choices=list(TRAIN_PRESETS), help="sizes; default gpu on CUDA, else cpu")
    add("--out", default=None, help="output folder (default runs/<preset>)")
    add("--seed", type=int, default=0, help="seed for the world, the model and the sampling")
    add("--stages", default=None, help="text, contrastive, elva: stages 1-3 (default all three; 2-3 with "
        "--mbeir)")
    add_run_flags(p)   # --resume, --device, --threads, --log_every, --profile, ... (runtime.py)
    add = p.add_argument_group("data: GrainWorld, or M-BEIR in UniIR's layout with --mbeir").add_argument
    add("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    add("--world_seed", type=int, default=None, help="GrainWorld's seed (default --seed): another --seed on "
        "the same world trains another model of it")
    add("--mbeir", default=None, help="an M-BEIR root: train on its train split, evaluate on its test split")
    add("--train_tasks", default="all", help="comma list of M-BEIR training tasks, or all")
    add("--mbeir_pool", default="union", choices=["union", "local"], help="the union pool or the tasks' own")
    add("--summary_field", default=None, help="an M-BEIR record field holding a reference summary (default "
        "none)")
    add("--eval_tasks", default=None, help="M-BEIR tasks to evaluate (default: the training tasks with a "
        "test file)")
    add = p.add_argument_group("stage 1: text (Sec. 3.3); batch, lr, tau, dropout: stage 2's").add_argument
    add("--text_steps", type=int, default=None, help="optimizer steps of the text stage")
    add = p.add_argument_group("stage 2: contrastive (Sec. 3.3)").add_argument
    add("--steps", type=int, default=None, help="optimizer steps")
    add("--batch_size", type=int, default=None, help="queries per step (each with its positive)")
    add("--lr", type=float, default=None, help="peak AdamW learning rate")
    add("--tau", type=float, default=0.05, help="InfoNCE temperature")
    add("--lm_weight", type=float, default=1.0, help="weight of the next-token loss on summaries")
    add("--summary_dropout", type=float, default=0.5, help="items embedded with an empty summary (ours; "
        "stage2_loss)")
    add = p.add_argument_group("stage 3: ELVA (Sec. 3.4)").add_argument
    add("--init", default=None, help="start checkpoint (default <out>/contrastive, the stage-2 model)")
    add("--rl_steps", type=int, default=None, help="optimizer steps")
    add("--rl_batch", type=int, default=None, help="queries per step")
    add("--group_size", type=int, default=None, help="G: rollouts per query (paper 8)")
    add("--n_hard", type=int, default=None, help="filtered hard negatives per query (paper 50)")
    add("--n_rand", type=int, default=None, help="random negatives per query (paper 50)")
    add("--hard_threshold", type=float, default=0.95, help="drop candidates above this stage-2 cosine from the "
        "hard negatives: likely false negatives (paper: not given)")
    add("--rl_lr", type=float, default=1e-5, help="AdamW learning rate (paper 1e-6 for 7B + LoRA)")
    add("--temperature", type=float, default=1.0, help="sampling temperature of rollout summaries (paper: not "
        "given)")
    add("--clip_eps", type=float, default=0.2, help="PPO clip range of the ratio (TRL's --epsilon; paper: not "
        "given)")
    add("--beta", type=float, default=0.2, help="KL coefficient to the reference model (paper 0.2)")
    add("--alpha", "--margin_weight", dest="alpha", type=float, default=ALPHA, help="weight of R_Margin "
        "(paper 0.4)")
    add("--epsilon", "--rank_weight", dest="epsilon", type=float, default=EPSILON, help="weight of R_Rank in "
        "R_total (paper 0.6; 0 ablates it; not TRL's --epsilon, which is --clip_eps here)")
    add("--delta", type=float, default=DEFAULT_DELTA, help="margin of R_Margin (paper: not given)")
    add("--gamma", default="auto", help="weight of R_Rank's negative term: auto (reward.auto_gamma) or a number")
    add("--train_vision", action="store_true", help="train the vision tower too (the paper freezes it)")
    add("--loss_norm", default="token", choices=["token", "sequence"], help="GRPO's mean (reward.grpo_loss)")
    return p


def get_args(argv=None, parser=None):
    """Parse (train.py's flags, or study.py's superset), fill the preset's values, check every
    flag."""
    args = (parser or build_parser()).parse_args(argv)
    if args.world_seed is None:
        args.world_seed = args.seed
    return resolve_stage_args(args, TRAIN_PRESETS, COMMON, len(TASKS))


# --------------------------------------------------------------------------------------------------
# The data, behind one interface (data.Source): GrainWorld here, M-BEIR in mbeir.py


def grainworld_source(cfg: WorldConfig) -> Source:
    world = GrainWorld(cfg)
    describe = f"world: {len(world.splits['train'])} train / {len(world.splits['test'])} test scenes"
    return Source(data=world, meta={"world": cfg.__dict__},
                  texts=functools.partial(data.world_corpus, world, seed=cfg.seed),
                  contrastive_inputs=make_stage2_inputs, rl_instances=build_rl_instances, describe=describe)


def read_source(args, meta: dict | None = None) -> Source:
    """The training data, read and checked whole before any work: from the flags, or (stage 3)
    from the stage-2 checkpoint's config.json, so that ELVA mines and trains on the data stage 2
    saw."""
    if meta is None and args.mbeir:
        import mbeir   # real data only when asked for
        meta = mbeir.meta_of(args)
    if meta is None:
        size = elva.PRESETS[args.preset].image_size
        meta = {"world": WorldConfig(args.world_seed, args.n_train, n_test=args.n_test, image_size=size).__dict__}
    if isinstance(meta.get("mbeir"), dict):
        import mbeir
        return mbeir.training_source(meta["mbeir"])
    if isinstance(meta.get("world"), dict):
        return grainworld_source(WorldConfig(**meta["world"]))
    fail("--init", args.init, "a stage-2 checkpoint whose config.json has a 'world' (or 'mbeir') section")


# --------------------------------------------------------------------------------------------------
# Stages 1 and 2 (Section 3.3): InfoNCE on [RET] embeddings of teacher-forced reference summaries,
# plus the summaries' next-token loss that teaches our from-scratch model to write summaries at all
# (Qwen2-VL already can). The paper's stages 1-2 embed at a fixed prompt token (LamRA's "in one
# word: <emb>"); ours embed at [RET] after the reference summary, so that one model and one template
# serve all three stages.


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg: torch.Tensor | None = None,
             target_offset: int = 0):
    """L = -1/N sum_n log( exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau) )   (ELVA, Section 3.3).

    eq (N, D), ec (M, D) or (N, M, D), unit vectors. With ec (M, D), candidate n (+ target_offset, when the
    candidates are gathered from several processes) is query n's positive; with ec (N, M, D), candidate 0 of each
    row is. false_neg (N, M) masks candidates known to be relevant, so a true match is never pushed away."""
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
    """An encoded batch (on the model's device) with its reference summaries teacher-forced ->
    (embeddings (N, D), summary-token log-probs (N, T), LM mask (N, T)). drop (N,) bool: rows
    embedded with an empty summary, out of the LM loss (summary dropout)."""
    with phase("forward"), autocast():
        logp, h = model.token_logprobs(b, imgs, groups=2)   # two passes of similar length: less padding
    lm_mask = b["gen_mask"] & ~drop.to(logp.device)[:, None]
    return model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def lm_loss(logp: torch.Tensor, lm_mask: torch.Tensor, args) -> torch.Tensor:
    """The summaries' next-token loss, a mean over the whole batch's summary tokens."""
    return -batch_mean(logp.sum(), lm_mask.sum(), args)


def stage2_loss(args, retriever, inputs: dict, autocast, device):
    """Stages 1-2's loss on one step's inputs: InfoNCE over in-batch negatives + lm_weight *
    next-token loss. -> (loss, InfoNCE, LM loss). Items are laid out as [B queries, then the
    candidates: their B positives first, then any extra negatives]; under torchrun the candidates of
    every process take part (gather_candidates).

    Summary dropout (ours): with teacher-forced reference summaries a query and its positive
    often carry near-identical text (for i2i the same string), so InfoNCE could be met by reading
    the summary alone. Dropping the summary of a random part of the items makes InfoNCE train
    perception too; the LM loss teaches every kept summary."""
    b, imgs = retriever.on_device(*inputs["encoded"])
    drop = torch.tensor(inputs["drop"])
    e, logp, lm_mask = teacher_forced_on(retriever.model, b, imgs, drop, autocast)
    B = inputs["n_queries"]
    ec, offset = gather_candidates(e[B:], args)                                # (candidates, D)
    l_nce = info_nce(e[:B], ec, args.tau, inputs["false_neg"].to(device), target_offset=offset)
    l_lm = lm_loss(logp, lm_mask, args)
    return l_nce + args.lm_weight * l_lm, l_nce, l_lm


def dropout_flags(rng: random.Random, n: int, rate: float) -> list[bool]:
    """Summary dropout: which of n items are embedded with an empty summary."""
    return [rng.random() < rate for _ in range(n)]


def make_text_inputs(args, world, step: int) -> dict:
    """Stage 1's global batch, made without the model from the step's seed (so --resume and any
    number of DataLoader workers replay it): B (scene, premise, entailed rewording, one-grain
    contradiction) triplets, laid out as 3 blocks of B items (premises, entailed,
    contradictions), the dropout flags and the mask of the candidates each premise's scene
    satisfies (the target, its own entailed rewording, excluded)."""
    rng = random.Random(f"{args.seed}-text-{step}")
    scenes, triplets = [], []
    while len(triplets) < args.batch_size:
        s = rng.choice(world.splits["train"])
        t = data.nli_triplet(rng, s)
        if t is not None:
            scenes.append(s)
            triplets.append(t)
    B = len(triplets)
    drop = dropout_flags(rng, 3 * B, args.summary_dropout)
    caps = [t[k] for k in range(3) for t in triplets]                          # (3B,) block-major
    items = [data.Item(text=c.text(), summary=c.summary(), caption=c) for c in caps]
    false_neg = torch.tensor([[j != i and data.satisfies(s, c) for j, c in enumerate(caps[B:])]
                              for i, s in enumerate(scenes)])                 # (B, 2B)
    return {"blocks": 3, "items": items, "instructions": [None] * len(items), "drop": drop,
            "false_neg": false_neg}


def in_batch_false_negatives(queries) -> torch.Tensor:
    """(B, B) bool: query j's positive is relevant to query i too (candidates carry no
    instruction: any task's)."""
    return torch.tensor([[i != j and data.relevant(qi.task, qi.item, qj.positive) for j, qj in enumerate(queries)]
                         for i, qi in enumerate(queries)], dtype=torch.bool)


def make_stage2_inputs(args, world, step: int) -> dict:
    """Stage 2's global batch, made without the model from the step's seed: B queries over the
    four tasks (2 blocks: the queries with their task's instruction, their positives), dropout
    flags, false negatives."""
    rng = random.Random(f"{args.seed}-contrastive-{step}")
    queries = world.sample_queries(rng, args.batch_size)
    drop = dropout_flags(rng, 2 * len(queries), args.summary_dropout)
    items = [q.item for q in queries] + [q.positive for q in queries]
    instructions = [INSTRUCTIONS[q.task] for q in queries] + [None] * len(queries)
    return {"blocks": 2, "items": items, "instructions": instructions, "drop": drop,
            "false_neg": in_batch_false_negatives(queries)}


def open_embedding_stage(args, source: Source, tok, device, name: str, steps: int, init: Path | None):
    """A fresh model (seeded), or `init`'s weights, and its AdamW, in --out/name; None if already
    complete."""
    torch.manual_seed(args.seed)
    model = elva.build_model(copy.deepcopy(elva.PRESETS[args.preset]), tok).to(device)
    if init is not None:
        model.load_state_dict(elva.load_checkpoint(init, device)[0].state_dict())
        print(f"{name}: starts from {init}")
    compile_blocks(model, args)
    opt = adamw(model.parameters(), args.lr, args.weight_decay, device, name, Path(args.out) / name)
    meta = {**source.meta, "args": serializable(args), "stage": name}
    return open_stage(args, name, steps, elva.Retriever(model, tok), opt, meta, device)


def embedding_stage(args, source: Source, tok, device, autocast, name: str, steps: int, make_inputs,
                    init: Path | None, what: str):
    """The loop of stages 1 and 2: per step the global batch (make_inputs) -> this process's share -> the loss
    -> warm-up + cosine learning rate -> clipped AdamW step -> log; a checkpoint every ckpt_every steps and at
    the end (runtime.run_steps)."""
    stage = open_embedding_stage(args, source, tok, device, name, steps, init)
    if stage is None:
        return
    retriever, opt = stage.retriever, stage.opt
    n_params = sum(p.numel() for p in retriever.model.parameters()) / 1e6
    print(f"{name}: {n_params:.2f}M parameters, {steps} steps x {args.batch_size} {what}")
    retriever.model.train()
    encode = functools.partial(data.encode_pairs, retriever.enc, retriever.prompt_limit)
    inputs = step_inputs(args, functools.partial(make_inputs, args, source.data), my_part, encode,
                         stage.start, steps, device)

    def step_fn(step: int, batch: dict) -> dict:
        # the loss: InfoNCE over in-batch negatives (true matches masked) + the summaries'
        # next-token loss
        loss, l_nce, l_lm = stage2_loss(args, retriever, batch, autocast, device)
        # the update: warm-up + cosine schedule, clipped AdamW step
        lr = set_lr(opt, lr_at(step, steps, args.lr, args.warmup))
        gnorm = optimizer_step(opt, retriever.model, loss, args)
        # the log record: on a GPU the values stay on the device until the next log line
        return {"loss": loss.detach(), "infonce": l_nce.detach(), "lm": l_lm.detach(), "lr": lr,
                "grad_norm": gnorm.detach(), "masked_false_neg": int(batch["false_neg"].sum())}

    run_steps(args, stage, inputs, step_fn)
    print(f"{name}: saved {stage.folder}")


def text_stage(args, source: Source, tok, device, autocast):
    """Stage 1 (Sec. 3.3, after LamRA) in miniature: language-only InfoNCE on NLI-style triplets
    (data.nli_triplet): a caption of a training scene, an entailed rewording (positive), the
    caption with one grain contradicted (hard negative), plus in-batch negatives. Same model,
    template, summaries and dropout as stage 2; no images."""
    embedding_stage(args, source, tok, device, autocast, "text", args.text_steps, make_text_inputs, None,
                    "NLI triplets")


def contrastive_stage(args, source: Source, tok, device, autocast):
    """Stage 2 (Sec. 3.3): InfoNCE over in-batch negatives + the summaries' next-token loss, from
    stage 1's weights when this run has the text stage; the source's batches (GrainWorld's or
    M-BEIR's)."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    embedding_stage(args, source, tok, device, autocast, "contrastive", args.steps, source.contrastive_inputs,
                    init, "queries")


# --------------------------------------------------------------------------------------------------
# Stage 3: ELVA (Section 3.4). Balanced negatives mined with the stage-2 model, then GRPO over
# generated embeddings.


def build_rl_instances(args, world, retriever, autocast):
    """Per task, rl_queries RL queries on training scenes, each with its positive and n_hard
    filtered hard + n_rand random negatives mined from a pool of train scenes and their one-grain
    siblings (Section 3.4, negative sampling: hard negatives alone make the rewards of a group
    alike and the advantages vanish)."""
    rng = random.Random(f"{args.seed}-rl-data")
    gen = torch.Generator().manual_seed(args.seed)
    instances = []
    for task in TASKS:
        pool = world.rl_pool(task, args.rl_pool_scenes, rng)
        queries = []
        while len(queries) < args.rl_queries:
            scene = rng.choice(world.splits["train"]) if task == "i2t" else rng.choice(pool).scene
            q = data.make_query(task, rng, scene)
            if q is not None and q.item.target not in world.outside("train"):
                queries.append(q)
        rel = torch.tensor([[data.relevant(task, q.item, c) for c in pool] for q in queries])   # (Q, P) exact
        neg = data.mine_negatives(retriever, [q.item for q in queries], [INSTRUCTIONS[task]] * len(queries),
                                  pool, rel, args.n_hard, args.n_rand, args.hard_threshold, gen,
                                  autocast)                                                 # (Q, N)
        for q, idx in zip(queries, neg.tolist()):
            instances.append((q, [pool[i] for i in idx]))
    return instances


def instruction_of(q: data.Query) -> str:   # its own (real data) or its task's (GrainWorld)
    return q.instruction if q.instruction is not None else INSTRUCTIONS[q.task]


def rollout_items(batch) -> tuple[list, list]:
    """The items of a rollout batch, each once, in (instance, item) order -- query, positive,
    negatives -- and their instructions: the query gets its task's, candidates none (as in
    M-BEIR's pools)."""
    items, instr = [], []
    for q, negs in batch:
        items += [q.item, q.positive, *negs]
        instr += [instruction_of(q)] + [None] * (1 + len(negs))
    return items, instr


def make_rl_inputs(args, instances, step: int) -> list:
    """Stage 3's global batch: rl_batch instances drawn from the step's seed (so --resume replays
    them)."""
    return random.Random(f"{args.seed}-rl-batch-{step}").sample(instances, args.rl_batch)


def encode_rl_prompts(enc, limit: int, batch) -> dict:
    """A rollout batch's items' prompts, encoded without summaries (made ahead: no model needed)."""
    return {"batch": batch, "encoded": data.encode_batch(enc, *rollout_items(batch), None, limit)}


@dataclass
class Rollout:
    """One GRPO rollout batch: B instances x G rollouts x K = 2 + N items (query, positive, N negatives), that
    is S = B * G * K sequences in (instance, rollout, item) order. The G rollouts of an item share its prompt,
    held once (U = B * K prompts); the per-sequence tensors cover the summary part: the summary, then [RET]."""
    batch: dict             # prompt_tokens / prompt_attn (U, P), images, index (S,): each sequence's prompt;
                            # tokens / attn / gen_mask (S, Ts) and ret_pos (S,): the summary part
    sampled: torch.Tensor   # (S, Ts) bool: the tokens the policy sampled: the summary, and [RET] unless forced
    logp: torch.Tensor      # (S, Ts) float32 log-probs of those tokens under the policy, with gradient
    e: torch.Tensor         # (B, G, K, D) the unit [RET] embeddings: the paper's action
    scores: torch.Tensor    # (B, G, K - 1) cosine of each rollout's query to its positive (0) and negatives
    ranks: torch.Tensor     # (B, G, K - 1) their ranks in the rollout's list; the positive's by the reward's rule
    summaries: list         # S sampled summaries (token ids)

    @property
    def shape(self):
        return tuple(self.e.shape[:3])                                          # (B, G, K)


def rollout_index(B: int, G: int, K: int, device) -> torch.Tensor:
    """(S,): row (b, g, k) of a rollout batch continues prompt b * K + k."""
    index = torch.arange(B, device=device)[:, None, None] * K + torch.arange(K, device=device)
    return index.expand(B, G, K).reshape(-1)


def rollout_scores(e: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """e (B, G, K, D): per rollout the query then its K - 1 candidates -> cosine scores and ranks
    (B, G, K - 1), the positive's by the reward's rule: one fused Triton kernel on a GPU
    (kernels.cosine_ranks), its reference on CPU."""
    B, G, K, D = e.shape
    q, c = e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D)
    s, r = cosine_ranks(q, c, positive_last=True, backend=backend)
    return s.view(B, G, K - 1), r.view(B, G, K - 1)


def rollout(args, policy: elva.Retriever, made: dict, gen: torch.Generator, autocast) -> Rollout:
    """The paper's action (Section 3.4): for each of B instances and each of G rollouts, sample a summary of
    every item -- the query's, the positive's, each negative's -- then embed and score them (embed_rollout).
    Each item's prompt is read once and shared by its G rollouts: generation expands its KV cache."""
    B, G, K = len(made["batch"]), args.group_size, 2 + len(made["batch"][0][1])
    with phase("data"):   # the U = B * K unique items' prompts (U, P), left-padded, made ahead
        pb, images = policy.on_device(*made["encoded"])
    index = rollout_index(B, G, K, pb["tokens"].device)                        # (S,)
    with phase("generate"), autocast():
        summ, ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=args.temperature,
                                            generator=gen, return_ended=True, index=index)
    return embed_rollout(args, policy, pb, images, (B, G, K), summ, ended, autocast)


def embed_rollout(args, policy: elva.Retriever, pb: dict, images, shape: tuple, summaries, ended,
                  autocast) -> Rollout:
    """The sampled summaries teacher-forced after their shared prompts, with gradient (so the log-probs serve
    the update: on-policy, no second forward), embedded at [RET], and each rollout's candidates scored and
    ranked against its query. A [RET] appended after max_summary_len tokens was not sampled: it is left out of
    `sampled` (no advantage, no KL)."""
    B, G, K = shape
    dev = pb["tokens"].device
    index = rollout_index(B, G, K, dev)                                        # (S,)
    sb = data.collate_summaries(summaries, policy.enc.pad, policy.enc.ret)
    sb = {k: v.to(dev) for k, v in sb.items()}
    rb = {"prompt_tokens": pb["tokens"], "prompt_attn": pb["attn"], "images": images, "index": index, **sb}
    forced = ~torch.tensor(ended, device=dev)
    sampled = sb["gen_mask"].clone()
    sampled[torch.arange(len(summaries), device=dev)[forced], sb["ret_pos"][forced]] = False
    with phase("forward"), autocast():
        logp, h = policy.model.shared_prefix_logprobs(rb, args.temperature)
    # the embeddings keep their graph (the paper's loss reaches them only through the log-probs)
    e = policy.model.ret_embedding(h, rb["ret_pos"]).view(B, G, K, -1)         # (B, G, K, D)
    with phase("score"), torch.no_grad():
        scores, ranks = rollout_scores(e.detach())                             # (B, G, K - 1) each
    return Rollout(batch=rb, sampled=sampled, logp=logp.float(), e=e, scores=scores, ranks=ranks,
                   summaries=summaries)


def grpo_step(args, policy: elva.Retriever, ref: elva.Retriever, opt, made: dict, gen, autocast) -> dict:
    """ELVA's GRPO step (Section 3.4), in the paper's order:
      1. rollout     G sampled summaries of every item -> [RET] embeddings -> each rollout's ranked list
      2. reward      R_total = alpha R_Margin + epsilon R_Rank of each rollout's list, without gradient
      3. advantage   A = (R - mean) / (std + eps) over the query's G rollouts, shared by the rollout's summaries
      4. loss        PPO-clipped policy gradient on the sampled summary tokens + beta * KL(k3) to stage 2
      5. update      clipped AdamW step
    Kept: the clipped objective, the KL to the frozen stage-2 model. Dropped: entropy bonus,
    value function (GRPO has none). On-policy -- one update per rollout batch, as here -- the
    ratio is exactly 1 and the clip never acts: the gradient is REINFORCE's with the group's mean
    as baseline, plus the KL term. The clip is kept so that the objective is GRPO's as written;
    study.py's --num_iterations reuses a batch and makes it act."""
    # 1. rollout
    ro = rollout(args, policy, made, gen, autocast)
    B, G, K = ro.shape
    # 2. reward, from each rollout's scores and ranks alone
    R, parts = total_reward(ro.scores, args.alpha, args.epsilon, args.delta, args.gamma, return_parts=True,
                            ranks=ro.ranks)                                    # (B, G)
    # 3. group advantage, one per rollout, the same for each of its K summaries
    A = group_advantages(R)[:, :, None].expand(B, G, K).reshape(-1).to(ro.logp.device)   # (S,)
    # 4. loss: the rollout's own log-probs are the "old" ones; the frozen stage-2 model is the KL
    # reference
    with phase("reference"), torch.no_grad(), autocast():
        ref_logp, _ = ref.model.shared_prefix_logprobs(ro.batch, args.temperature)
    n_tokens = global_tokens(ro.sampled, args, args.loss_norm)               # None without torchrun
    loss, info = grpo_loss(ro.logp, ro.logp.detach(), ref_logp.float(), A, ro.sampled, args.clip_eps,
                           args.beta, n_tokens=n_tokens, norm=args.loss_norm)
    # 5. update
    optimizer_step(opt, policy.model, loss, args)
    # the log record (tensors: read from the device once per log line)
    R = R.float()
    lengths = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32)
    tied = (R.max(1).values - R.min(1).values) < 1e-6                 # (B,) groups with no gradient
    return {"loss": loss.detach(), "reward_mean": R.mean(), "reward_std": R.std(),
            "R_margin": parts["margin"].float().mean(), "R_rank": parts["rank"].float().mean(),
            "top1": (parts["pos_rank"] == 1).float().mean(), "tied_groups": tied.float().mean(),
            "kl": info["kl"], "clip_low": info["clip_low"], "clip_high": info["clip_high"],
            "summary_len": lengths.mean()}


@dataclass
class ElvaSetup:
    """What stage 3 starts from: its stage (the policy and its optimizer), the frozen reference,
    the instances."""
    stage: object       # runtime.Stage: the policy (stage.retriever), its AdamW, folder, start step
    ref: elva.Retriever     # the frozen stage-2 model: KL reference and negative miner
    instances: list         # the mined RL instances [(Query, [negative Items])]


def open_elva_stage(args, device, autocast) -> ElvaSetup | None:
    """Stage 3's set-up: the policy starts as the stage-2 model (--init), which also stays frozen
    as the KL reference and mines the negatives; None if the stage's folder already holds every
    step."""
    init = Path(args.init or Path(args.out) / "contrastive")
    ref = elva.Retriever.from_pretrained(init, device)
    source = read_source(args, ref.meta)      # the stage-2 model's data; --seed varies only RL here
    model = copy.deepcopy(ref.model).train()
    for p in ref.model.parameters():
        p.requires_grad_(False)
    # the paper freezes the vision encoder and trains the language model (with LoRA at 7B; our
    # decoder is small enough to train whole): the vision tower and projector stay as stage 2 left
    # them unless --train_vision
    if not args.train_vision:
        for p in model.vision_parameters():
            p.requires_grad_(False)
    compile_blocks(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    folder = Path(args.out) / args.elva_name
    opt = adamw(trainable, args.rl_lr, 0.0, device, args.elva_name, folder)
    meta = {**source.meta, "args": serializable(args), "stage": "elva", "init": str(init)}
    stage = open_stage(args, args.elva_name, args.rl_steps, elva.Retriever(model, ref.tok), opt, meta, device)
    if stage is None:
        return None
    # the RL instances: queries with balanced negatives mined by the stage-2 model (Section 3.4)
    t0 = time.time()
    instances = source.rl_instances(args, source.data, ref, autocast)
    C = 1 + args.n_hard + args.n_rand
    gamma = f"{auto_gamma(C):.4f} (auto for C = {C})" if args.gamma is None else f"{args.gamma:.4f}"
    n_train = sum(p.numel() for p in trainable) / 1e6
    n_all = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.elva_name}: mined {len(instances)} RL instances ({args.n_hard} hard + {args.n_rand} random "
          f"negatives each) in {time.time() - t0:.0f}s; {args.rl_steps} steps x {args.rl_batch} queries x "
          f"G={args.group_size}; alpha {args.alpha}, epsilon {args.epsilon}, delta {args.delta}, gamma {gamma}; "
          f"trains {n_train:.2f}M of {n_all:.2f}M parameters"
          f"{' (vision frozen)' if not args.train_vision else ''}")
    return ElvaSetup(stage, ref, instances)


def rl_inputs(args, instances, stage, device):
    """The steps' rollout batches (runtime.step_inputs): drawn from `instances`, this process's
    share, encoded."""
    enc, limit = stage.retriever.enc, stage.retriever.prompt_limit
    return step_inputs(args, functools.partial(make_rl_inputs, args, instances), my_share,
                       functools.partial(encode_rl_prompts, enc, limit), stage.start, stage.steps, device)


def elva_stage(args, device, autocast):
    """Stage 3: rl_steps GRPO steps from the stage-2 model (open_elva_stage), each step's
    sampling seeded."""
    t0 = time.time()
    setup = open_elva_stage(args, device, autocast)
    if setup is None:
        return
    stage = setup.stage
    inputs = rl_inputs(args, setup.instances, stage, device)
    gen = torch.Generator(device=device)

    def step_fn(step: int, made: dict) -> dict:   # rollout -> reward -> advantage -> loss -> update
        return grpo_step(args, stage.retriever, setup.ref, stage.opt, made, gen, autocast)

    run_steps(args, stage, inputs, step_fn, show=ELVA_SHOWN, gen=gen)
    print(f"{stage.name}: saved {stage.folder} ({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------------------------------
# The pipeline


def start_run(args):
    """torchrun, threads, the device, the run folder; -> (device, autocast, threads). Printed as
    it goes."""
    init_distributed(args)
    threads = set_threads(args)
    device, autocast = resolve_device(args.device)
    if args.rank == 0:
        check_run_folder(args, SHAPING_ARGS)
    barrier(args)
    torch.manual_seed(args.seed)
    shown = [f"--{k} {','.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
             if k in SHOWN_ARGS and v is not None]
    print("args:", " ".join(shown), f"(all: {args.out}/<stage>/config.json)")
    return device, autocast, threads


def source_and_tokenizer(args, t0: float):
    """The training data and the run's tokenizer (trained once, by the first process)."""
    source = read_source(args)
    if args.rank == 0:
        build_tokenizer(args, source.texts)
    barrier(args)
    tok = build_tokenizer(args, source.texts)   # the first process trained and wrote it
    print(f"{source.describe} | tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)")
    return source, tok


def finish_run(args, device, threads: int, t0: float, eval_tasks: str | None = None):
    """The final evaluation (eval.py, in its own process) and the total time."""
    if not args.no_eval and args.rank == 0:
        evaluate_run(args, Path(args.out), device, threads, eval_tasks)
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    if args.world_size > 1:
        barrier(args)
        dist.destroy_process_group()


def main(argv=None):
    """The pipeline: stage 1 -> stage 2 -> stage 3 -> evaluation."""
    args = get_args(argv)
    eval_tasks = None
    if args.mbeir:
        import mbeir   # the M-BEIR test tasks are checked before any training
        eval_tasks = mbeir.eval_tasks(args)
    device, autocast, threads = start_run(args)
    t0 = time.time()
    if "contrastive" in args.stages:
        source, tok = source_and_tokenizer(args, t0)
        if "text" in args.stages:
            text_stage(args, source, tok, device, autocast)
        contrastive_stage(args, source, tok, device, autocast)
    if "elva" in args.stages:
        elva_stage(args, device, autocast)
    finish_run(args, device, threads, t0, eval_tasks)


if __name__ == "__main__":
    main()
