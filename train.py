"""
Training: the contrastive stage (InfoNCE on generated-embedding [RET] states) and the ELVA stage (GRPO with the
paper's margin and ranking rewards over balanced negatives, KL to the stage-2 model). PAPER.md, Sections 3.2-3.4.

    python train.py                       # default preset (gpu on CUDA, else cpu): contrastive -> ELVA -> eval table
    python train.py --preset smoke        # the whole pipeline in under 2 minutes on 2 CPU cores
    python train.py --stages elva --rl_objective contrastive --elva_name control   # the equal-compute control
    python train.py --help                # every flag, grouped

Outputs under --out (default runs/<preset>): tokenizer.json, one checkpoint folder per stage (model.safetensors,
config.json with the resolved arguments, tokenizer.json, optimizer.safetensors for --resume), log.jsonl per stage,
and eval.json from the final `python eval.py` run.

Stage 1 of the paper (language-only NLI pretraining) has no counterpart here: our decoder learns its language from
GrainWorld's text in stage 2 (README, "Choices the paper leaves open").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import elva
from data import INSTRUCTIONS, TASKS, GrainWorld, WorldConfig
from kernels import cosine_scores
from reward import DEFAULT_DELTA, DEFAULT_GAMMA, group_advantages, grpo_loss, sequence_credit, total_reward

# ----------------------------------------------------------------------------------------------------------------------
# Presets: sizes of the world and of each stage. The model sizes live in elva.PRESETS.

TRAIN_PRESETS = {
    "smoke": dict(n_train=400, n_test=60, steps=40, batch_size=16, lr=2e-3, rl_steps=6, rl_batch=2, group_size=4,
                  n_hard=2, n_rand=2, rl_queries=8, rl_pool_scenes=40, eval_queries=20, mrbench_per_task=6,
                  log_every=5),
    "cpu": dict(n_train=6000, n_test=500, steps=1000, batch_size=48, lr=1e-3, rl_steps=150, rl_batch=2,
                group_size=8, n_hard=4, n_rand=4, rl_queries=200, rl_pool_scenes=300, eval_queries=200,
                mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, steps=6000, batch_size=128, lr=5e-4, rl_steps=400, rl_batch=8,
                group_size=8, n_hard=16, n_rand=16, rl_queries=1000, rl_pool_scenes=1500, eval_queries=250,
                mrbench_per_task=250, log_every=50),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=None, choices=list(TRAIN_PRESETS), help="sizes; default gpu on CUDA, else cpu")
    g.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    g.add_argument("--seed", type=int, default=0, help="seed for the world, the model and the sampling")
    g.add_argument("--stages", default="contrastive,elva", help="comma list of stages to run: contrastive, elva")
    g.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint in --out")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--log_every", type=int, default=None, help="steps between log lines")
    g.add_argument("--ckpt_every", type=int, default=250, help="steps between checkpoints")
    g.add_argument("--no_eval", action="store_true", help="skip the final evaluation table")
    g = p.add_argument_group("world (GrainWorld)")
    g.add_argument("--n_train", type=int, default=None, help="training scenes")
    g.add_argument("--n_test", type=int, default=None, help="test scenes (= the standard test pool size)")
    g.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    g = p.add_argument_group("contrastive stage (InfoNCE + next-token loss on reference summaries)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=None, help="queries per step (each with its positive)")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    g.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    g.add_argument("--lm_weight", type=float, default=1.0, help="weight of the next-token loss on summaries")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--summary_dropout", type=float, default=0.5, help="fraction of items embedded with an empty "
                   "summary in InfoNCE (ours; see contrastive_stage)")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    g = p.add_argument_group("ELVA stage (GRPO with rule-based ranking rewards)")
    g.add_argument("--elva_name", default="elva", help="checkpoint folder name of this run (e.g. control, no_margin)")
    g.add_argument("--init", default=None, help="start checkpoint (default <out>/contrastive: the stage-2 model)")
    g.add_argument("--rl_objective", default="grpo", choices=["grpo", "contrastive"],
                   help="grpo: the paper's ELVA; contrastive: the equal-compute control (InfoNCE on the same "
                        "candidate sets, same steps and queries)")
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
    g.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="weight of R_Rank's negative term (0 ablates "
                   "it; paper: not given)")
    g.add_argument("--pathwise", type=float, default=0.0, help="ours, beyond the paper: weight of -R_total used "
                   "as a differentiable loss through the embeddings, added to GRPO's (0: the paper's method)")
    g.add_argument("--credit", default="rollout", choices=["rollout", "sequence"],
                   help="rollout: the paper's, every summary of a rollout shares its reward; sequence: ours, each "
                        "summary credited for its own part of the ranking (reward.sequence_credit)")
    g.add_argument("--toy_reward", action="store_true", help="replace the paper's reward by a verifiable toy one "
                   "(fraction of colour words in the rollout's summaries): checks that GRPO itself learns")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_queries", type=int, default=None, help="standard-split queries per task")
    g.add_argument("--mrbench_per_task", type=int, default=None, help="MRBench-mini queries per task")
    args = p.parse_args(argv)
    return resolve_args(args)


def resolve_args(args):
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    if args.preset not in TRAIN_PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}; expected one of {list(TRAIN_PRESETS)}")
    for k, v in TRAIN_PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"runs/{args.preset}"
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in ("contrastive", "elva")]
    if bad:
        raise SystemExit(f"--stages: unknown stage(s) {bad}; expected contrastive and/or elva")
    if args.group_size < 2 and args.rl_objective == "grpo":
        raise SystemExit(f"--group_size must be >= 2 for GRPO (got {args.group_size}): advantages need a group")
    if args.n_hard + args.n_rand < 1:
        raise SystemExit("--n_hard + --n_rand must be >= 1: a ranking needs a negative")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Set-up shared by the stages


def world_config(args) -> WorldConfig:
    return WorldConfig(seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                       image_size=elva.PRESETS[args.preset].image_size)


def build_tokenizer(args, world: GrainWorld):
    path = Path(args.out) / "tokenizer.json"
    if path.exists():
        return data.load_tokenizer(path)
    tok = data.train_tokenizer(data.world_corpus(world, seed=args.seed), args.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    elva._atomic_write(path, lambda p: tok.save(str(p)))
    return tok


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def save_optimizer(folder: Path, opt: torch.optim.Optimizer, model):
    """AdamW state as safetensors (no pickles): exp_avg / exp_avg_sq per parameter name, step in the key."""
    from safetensors.torch import save_file
    names = {p: n for n, p in model.named_parameters()}
    state = {}
    for p, s in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            state[f"{names[p]}::{k}"] = s[k].detach().cpu().contiguous()
        state[f"{names[p]}::step"] = torch.as_tensor(s["step"]).float().reshape(1).cpu()
    elva._atomic_write(folder / "optimizer.safetensors", lambda f: save_file(state, str(f)))


def load_optimizer(folder: Path, opt: torch.optim.Optimizer, model):
    from safetensors.torch import load_file
    path = folder / "optimizer.safetensors"
    if not path.is_file():
        return
    state = load_file(str(path))
    for n, p in model.named_parameters():
        if f"{n}::exp_avg" in state:
            opt.state[p] = {"exp_avg": state[f"{n}::exp_avg"].to(p.device),
                            "exp_avg_sq": state[f"{n}::exp_avg_sq"].to(p.device),
                            "step": state[f"{n}::step"][0].clone()}


class Logger:
    """One plain line per log step and a JSONL record per step."""

    def __init__(self, folder: Path, stage: str, total: int, start: int, every: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.f = open(folder / "log.jsonl", "a")
        self.stage, self.total, self.start, self.every = stage, total, start, every
        self.t0 = time.time()

    def log(self, step: int, rec: dict):
        elapsed = time.time() - self.t0
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


def optimizer_step(opt: torch.optim.Optimizer, model, loss: torch.Tensor, step: int, stage: str) -> torch.Tensor:
    """Check the loss is finite, backward, clip the gradient norm to 1, step. Returns the pre-clip gradient norm."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} step {step}: loss is {loss.item()}; stopping rather than training on it "
                                 f"(the last good checkpoint is kept)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return gnorm


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: contrastive (InfoNCE on [RET] embeddings with teacher-forced reference summaries + next-token loss)


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg: torch.Tensor | None = None):
    """L = -1/N sum_n log( exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau) )   (PAPER.md, stage 2).

    eq (N, D), ec (N, M, D) or (M, D) unit vectors. With ec (M, D), candidate n is query n's positive (in-batch
    negatives); with ec (N, M, D), candidate 0 of each row is its positive. false_neg (N, M) bool masks candidates
    known to be relevant (GrainWorld knows them), so that a true match is never pushed away as a negative."""
    if ec.dim() == 2:
        logits = eq @ ec.T / tau                                               # (N, M)
        target = torch.arange(eq.shape[0], device=eq.device)
    else:
        logits = torch.einsum("nd,nmd->nm", eq, ec) / tau                      # (N, M)
        target = torch.zeros(eq.shape[0], dtype=torch.long, device=eq.device)
    if false_neg is not None:
        logits = logits.masked_fill(false_neg, float("-inf"))
    return F.cross_entropy(logits.float(), target)


def in_batch_false_negatives(queries) -> torch.Tensor:
    """(B, B) bool: candidate j (another query's positive) is relevant to query i, for the same task."""
    B = len(queries)
    m = torch.zeros(B, B, dtype=torch.bool)
    for i, qi in enumerate(queries):
        for j, qj in enumerate(queries):
            if i != j and qi.task == qj.task and data.relevant(qi.task, qi.item, qj.positive):
                m[i, j] = True
    return m


def teacher_forced(retriever, items, instructions, autocast, drop: list[bool] | None = None):
    """Reference summaries, teacher-forced: -> (embeddings (N, D), summary-token log-probs (N, T), LM mask (N, T)).

    drop[i] = True replaces item i's summary by an empty one ([RET] right after the prompt) and takes the row out of
    the LM loss (summary dropout, ours: see contrastive_stage)."""
    enc = retriever.enc
    drop = drop or [False] * len(items)
    b, imgs = retriever.batch(items, instructions, [[] if d else enc.summary(it.summary) for it, d in zip(items, drop)])
    with autocast():
        logp, h = retriever.model.token_logprobs(b, imgs)
    lm_mask = b["gen_mask"] & ~torch.tensor(drop, device=logp.device)[:, None]
    return retriever.model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def contrastive_stage(args, world, tok, device, autocast):
    folder = Path(args.out) / "contrastive"
    cfg = copy.deepcopy(elva.PRESETS[args.preset])
    cfg.vocab_size = tok.get_vocab_size()
    torch.manual_seed(args.seed)
    model = elva.ELVAModel(cfg, tok.token_to_id("[IMG]"), tok.token_to_id("[RET]"), tok.token_to_id("[PAD]")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    start = 0
    if args.resume and (folder / "model.safetensors").exists():
        model, _, meta = elva.load_checkpoint(folder, device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
        load_optimizer(folder, opt, model)
        start = meta["step"] + 1
        print(f"contrastive: resumed from {folder} at step {start}")
    if start >= args.steps:
        print(f"contrastive: already complete ({args.steps} steps) in {folder}")
        return
    n = sum(p.numel() for p in model.parameters())
    print(f"contrastive: {n / 1e6:.2f}M parameters, {args.steps} steps x {args.batch_size} queries")
    enc = data.Encoder(tok, cfg.n_img_tokens, cfg.image_size)
    retriever = elva.Retriever(model, enc)
    logger = Logger(folder, "contrastive", args.steps, start, args.log_every)
    meta = {"world": asdict(world.cfg), "args": vars(args), "stage": "contrastive"}
    model.train()
    for step in range(start, args.steps):
        rng = random.Random(f"{args.seed}-contrastive-{step}")   # per-step seed: --resume replays the same data
        queries = world.sample_queries(rng, args.batch_size)
        items = [q.item for q in queries] + [q.positive for q in queries]
        instr = [INSTRUCTIONS[q.task] for q in queries] + [None] * len(queries)
        # Summary dropout (ours): with teacher-forced reference summaries, a query and its positive often carry
        # near-identical summary text (for i2i the very same string), so InfoNCE can be met by reading the summary
        # and never teaches the [RET] state to look at the input. Dropping the summary of a random part of the items
        # makes InfoNCE train perception directly; the LM loss still teaches every kept summary.
        drop = [rng.random() < args.summary_dropout for _ in items]
        e, logp, gen_mask = teacher_forced(retriever, items, instr, autocast, drop)
        B = len(queries)
        l_nce = info_nce(e[:B], e[B:], args.tau, in_batch_false_negatives(queries).to(device))
        l_lm = -logp.sum() / gen_mask.sum().clamp(min=1)
        loss = l_nce + args.lm_weight * l_lm
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for gr in opt.param_groups:
            gr["lr"] = lr
        gnorm = optimizer_step(opt, model, loss, step, "contrastive")
        logger.log(step, {"loss": loss.item(), "infonce": l_nce.item(), "lm": l_lm.item(), "lr": lr,
                          "grad_norm": gnorm.item()})
        if (step + 1) % args.ckpt_every == 0 or step == args.steps - 1:
            elva.save_checkpoint(folder, model, tok, {**meta, "step": step})
            save_optimizer(folder, opt, model)
    print(f"contrastive: saved {folder}")


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: ELVA. Balanced negatives mined with the stage-2 model, then GRPO over generated embeddings.


def build_rl_instances(args, world, retriever, autocast):
    """For each task: RL queries on training scenes, each with its positive and n_hard + n_rand negatives mined from
    a pool of train scenes and their one-grain siblings (PAPER.md, "Negative sampling for RL")."""
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


def toy_reward(texts: list[str]) -> float:
    """A verifiable toy reward for checking GRPO itself: the fraction of colour words among summary words."""
    words = [w for t in texts for w in t.replace(";", " ").split()]
    return sum(w in data.COLORS for w in words) / max(1, len(words))


def rollout_scores(e: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """e (B, G, K, D): per rollout the query's embedding then its K - 1 candidates' -> cosine scores (B, G, K - 1)."""
    B, G, K, D = e.shape
    return cosine_scores(e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D), backend).view(B, G, K - 1)


def rollout(args, policy: elva.Retriever, batch, gen: torch.Generator, autocast):
    """One GRPO rollout batch. For each of B instances and each of G rollouts, sample a summary for the query, the
    positive and every negative, embed all at [RET], score with cosine and reward the ranked list.

    The teacher-forced pass that embeds the rollouts runs with gradient, so its log-probs serve the first policy
    update too (no second forward). Returns the batch, logp (S, T) and hidden states over S = B * G * (2 + N)
    sequences (order: instance, rollout, item), scores (B, G, 1 + N) and rewards (B, G)."""
    G = args.group_size
    items, instr = [], []
    for q, negs in batch:
        one = [q.item, q.positive, *negs]
        ins = [INSTRUCTIONS[q.task]] + [None] * (1 + len(negs))
        for _ in range(G):
            items += one
            instr += ins
    K = 2 + len(batch[0][1])
    with autocast():
        summ = policy.summarise(items, instr, temperature=args.temperature, generator=gen)
    b, imgs = policy.batch(items, instr, summ)
    with autocast():
        logp, h = policy.model.token_logprobs(b, imgs, args.temperature)
    with torch.no_grad():
        e = policy.model.ret_embedding(h, b["ret_pos"]).view(len(batch), G, K, -1)   # (B, G, K, D)
        scores = rollout_scores(e)                                                  # (B, G, K - 1)
    B = len(batch)
    if args.toy_reward:
        texts = [policy.enc.decode(s) for s in summ]
        R = torch.tensor([toy_reward(texts[i * K:(i + 1) * K]) for i in range(B * G)]).view(B, G)
        parts = {"margin": torch.zeros(B, G), "rank": torch.zeros(B, G), "pos_rank": torch.ones(B, G)}
    else:
        R, parts = total_reward(scores.cpu(), args.alpha, args.epsilon, args.delta, args.gamma, return_parts=True)
    return {"batch": b, "images": imgs, "logp": logp.float(), "h": h, "e": e, "scores": scores, "rewards": R,
            "parts": parts, "summ_len": sum(len(s) for s in summ) / len(summ), "K": K}


def grpo_step(args, policy, ref_model, opt, batch, gen, autocast, step):
    """rollout -> reward -> group advantage -> clipped loss with KL (reward.grpo_loss), num_iterations updates."""
    ro = rollout(args, policy, batch, gen, autocast)
    R = ro["rewards"]                                                          # (B, G)
    K = ro["K"]
    if args.credit == "sequence":  # ours: each summary's own credit, normalised over the group per item slot
        en = torch.nn.functional.normalize(ro["e"].float(), dim=-1).cpu()    # (B, G, K, D)
        S = torch.einsum("bqd,bgjd->bqgj", en[:, :, 0], en[:, :, 1:])         # (B, G', G, K - 1)
        credit = sequence_credit(S, args.alpha, args.epsilon, args.delta, args.gamma)   # (B, G, K)
        A = group_advantages(credit.permute(0, 2, 1).reshape(-1, R.shape[1]))           # (B * K, G)
        A_seq = A.view(R.shape[0], K, R.shape[1]).permute(0, 2, 1).reshape(-1)         # (S,) in (b, g, k) order
    else:  # the paper's: one advantage per rollout, shared by all its summaries
        A = group_advantages(R)                                                # (B, G)
        A_seq = A[:, :, None].expand(-1, -1, K).reshape(-1)                    # (S,): one per summary
    A_seq = A_seq.to(ro["logp"].device)
    b, imgs = ro["batch"], ro["images"]
    old_logp = ro["logp"].detach()                                             # the rollout policy's log-probs
    with torch.no_grad(), autocast():
        ref_logp, _ = ref_model.token_logprobs(b, imgs, args.temperature)
    for it in range(args.num_iterations):
        if it == 0:
            logp, h = ro["logp"], ro["h"]                                      # on-policy: ratio exactly 1
        else:
            with autocast():
                logp, h = policy.model.token_logprobs(b, imgs, args.temperature)
        loss, info = grpo_loss(logp.float(), old_logp, ref_logp.float(), A_seq, b["gen_mask"],
                               args.clip_eps, args.beta)
        if args.pathwise > 0:
            # ours, not the paper's: R_total is differentiable almost everywhere in the scores, so its gradient
            # through the embeddings (of the sampled summaries) is added to GRPO's
            e = policy.model.ret_embedding(h, b["ret_pos"]).view(*R.shape, ro["K"], -1)   # (B, G, K, D)
            sc = rollout_scores(e, backend="torch")                        # the differentiable reference
            R_path = total_reward(sc, args.alpha, args.epsilon, args.delta, args.gamma, backend="torch")
            loss = loss - args.pathwise * R_path.mean()
        optimizer_step(opt, policy.model, loss, step, "elva")
    tied = ((R.max(1).values - R.min(1).values) < 1e-6).float().mean()
    return {"loss": loss.item(), "reward_mean": R.mean().item(), "reward_std": R.std().item(),
            "R_margin": ro["parts"]["margin"].mean().item(), "R_rank": ro["parts"]["rank"].mean().item(),
            "top1": (ro["parts"]["pos_rank"] == 1).float().mean().item(), "tied_groups": tied.item(),
            "kl": info["kl"].item(), "clip_frac": info["clip_frac"].item(), "summary_len": ro["summ_len"]}


def control_step(args, policy, opt, batch, autocast, step):
    """The equal-compute control: InfoNCE over the same candidate sets (positive + the mined negatives) with
    teacher-forced reference summaries and the next-token loss, one optimizer step per batch as GRPO takes."""
    policy.model.train()
    items, instr = [], []
    for q, negs in batch:
        items += [q.item, q.positive, *negs]
        instr += [INSTRUCTIONS[q.task]] + [None] * (1 + len(negs))
    e, logp, gen_mask = teacher_forced(policy, items, instr, autocast)
    K = 2 + len(batch[0][1])
    e = e.view(len(batch), K, -1)                                              # (B, K, D)
    l_nce = info_nce(e[:, 0], e[:, 1:], args.tau)
    l_lm = -logp.sum() / gen_mask.sum()
    loss = l_nce + args.lm_weight * l_lm
    optimizer_step(opt, policy.model, loss, step, "control")
    return {"loss": loss.item(), "infonce": l_nce.item(), "lm": l_lm.item()}


def elva_stage(args, device, autocast):
    init = Path(args.init or Path(args.out) / "contrastive")
    folder = Path(args.out) / args.elva_name
    model, tok, init_meta = elva.load_checkpoint(init, device)
    world = GrainWorld(WorldConfig(**init_meta["world"]))   # the stage-2 model's world; --seed varies only RL here
    enc = data.Encoder(tok, model.cfg.n_img_tokens, model.cfg.image_size)
    ref_model = copy.deepcopy(model).eval()          # the frozen stage-2 model: KL anchor (and negative miner)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    start = 0
    if args.resume and (folder / "model.safetensors").exists():
        model, _, meta = elva.load_checkpoint(folder, device)
        start = meta["step"] + 1
        print(f"{args.elva_name}: resumed from {folder} at step {start}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, weight_decay=0.0, betas=(0.9, 0.98))
    if start:
        load_optimizer(folder, opt, model)
    if start >= args.rl_steps:
        print(f"{args.elva_name}: already complete ({args.rl_steps} steps) in {folder}")
        return
    t0 = time.time()
    instances = build_rl_instances(args, world, elva.Retriever(ref_model, enc), autocast)
    print(f"{args.elva_name}: mined {len(instances)} RL instances ({args.n_hard} hard + {args.n_rand} random "
          f"negatives each) in {time.time() - t0:.0f}s; objective {args.rl_objective}"
          f"{' (toy reward)' if args.toy_reward else ''}, {args.rl_steps} steps x {args.rl_batch} queries x "
          f"G={args.group_size}")
    policy = elva.Retriever(model, enc)
    logger = Logger(folder, args.elva_name, args.rl_steps, start, args.log_every)
    meta = {"world": init_meta["world"], "args": vars(args), "stage": "elva", "init": str(init)}
    gen = torch.Generator(device=device)
    for step in range(start, args.rl_steps):
        gen.manual_seed(args.seed * 100003 + step)
        rng = random.Random(f"{args.seed}-rl-batch-{step}")
        batch = rng.sample(instances, args.rl_batch)
        if args.rl_objective == "grpo":
            rec = grpo_step(args, policy, ref_model, opt, batch, gen, autocast, step)
        else:
            rec = control_step(args, policy, opt, batch, autocast, step)
        logger.log(step, rec)
        if (step + 1) % args.ckpt_every == 0 or step == args.rl_steps - 1:
            elva.save_checkpoint(folder, model, tok, {**meta, "step": step})
            save_optimizer(folder, opt, model)
    print(f"{args.elva_name}: saved {folder} ({time.time() - t0:.0f}s)")


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    device, autocast = elva.resolve_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("args:", json.dumps(vars(args)))
    t0 = time.time()
    if "contrastive" in args.stages:
        world = GrainWorld(world_config(args))
        tok = build_tokenizer(args, world)
        print(f"world: {len(world.splits['train'])} train / {len(world.splits['test'])} test scenes | "
              f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)")
        contrastive_stage(args, world, tok, device, autocast)
    if "elva" in args.stages:
        elva_stage(args, device, autocast)
    if not args.no_eval:
        ckpts = [c for c in ("contrastive", args.elva_name) if (out / c / "model.safetensors").exists()]
        cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), "--out", str(out / "eval.json"),
               "--queries", str(args.eval_queries), "--mrbench_per_task", str(args.mrbench_per_task),
               "--device", str(device)]
        for c in ckpts:
            cmd += ["--ckpt", str(out / c)]
        print("eval:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)   # eval.py is a program of its own; no module imports it (DESIGN.md)
    print(f"total time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
