"""
Training: the paper's three stages (ELVA, Sections 3.3-3.4), top to bottom.
  stage 1  language-only InfoNCE on NLI-style caption triplets                    text_stage
  stage 2  InfoNCE on generated [RET] embeddings + the summaries' next-token loss  contrastive_stage
  stage 3  ELVA: negatives mined by the stage-2 model, then GRPO on the margin and elva_stage,
           ranking rewards with a KL to the stage-2 model                          grpo_step

    python train.py                  # preset gpu on CUDA, else cpu: stages 1-3, then eval.py
    python train.py --preset smoke   # the whole pipeline in under a minute on 2 CPU cores
    python train.py --mbeir ROOT     # stages 2-3 on M-BEIR (python mbeir.py --sample DIR: a sample)
    torchrun --nproc_per_node=N train.py   # data-parallel on N processes (GPUs, or CPUs: gloo)

This file is the paper only. Our variants and the equal-compute control live in study.py, which
builds its own steps from the pieces here. runtime.py holds the machinery (flag checks, the stage
loop, logs, checkpoints, torchrun): a reader of the paper may skip it. Outputs under --out (default
runs/<preset>): run.json, tokenizer.json, a checkpoint folder per stage with its log.jsonl,
eval.json.
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
import torch.nn.functional as F

import data
import elva
from data import TASKS, Source, WorldConfig
from kernels import cosine_ranks
from reward import (ALPHA, DEFAULT_DELTA, EPSILON, auto_gamma, group_advantages, grpo_loss,
                    total_reward)
from runtime import (Parser, adamw, add_run_flags, batch_mean, fail, finish_run, gather_candidates,
                     global_tokens, lr_at, my_part, my_share, open_stage, optimizer_step, phase,
                     resolve_stage_args, run_steps, serializable, set_lr, source_tokenizer,
                     start_run, step_inputs, compile_blocks, one_line_errors)


# --------------------------------------------------------------------------------------------------
# Presets: the world's and each stage's sizes (the model's are in elva.PRESETS). Keys with no flag
# here (n_train, rl_queries, ...) are set by study.py's flags.

TRAIN_PRESETS = {
    # smoke: the whole pipeline in under a minute on 2 CPU cores (tests, CI)
    "smoke": dict(n_train=400, n_test=60, text_steps=10, steps=40, batch_size=16, lr=2e-3,
                  rl_steps=6, rl_batch=2, group_size=4, n_hard=2, n_rand=2, rl_queries=8,
                  rl_pool_scenes=40, eval_queries=20, mrbench_per_task=6, log_every=5),
    # cpu: the default without a GPU, about a quarter of an hour on 2 cores
    "cpu": dict(n_train=6000, n_test=500, text_steps=300, steps=1000, batch_size=48, lr=1e-3,
                rl_steps=150, rl_batch=2, group_size=8, n_hard=4, n_rand=4, rl_queries=200,
                rl_pool_scenes=300, eval_queries=200, mrbench_per_task=100, log_every=25),
    "gpu": dict(n_train=20000, n_test=1000, text_steps=1000, steps=6000, batch_size=128, lr=5e-4,
                rl_steps=400, rl_batch=8, group_size=8, n_hard=16, n_rand=16, rl_queries=1000,
                rl_pool_scenes=1500, eval_queries=250, mrbench_per_task=250, log_every=50),
}
# Every preset's: AdamW's weight decay and warm-up, one GRPO update per batch (on-policy), stage 3's
# folder.
COMMON = dict(weight_decay=0.05, warmup=0.05, num_iterations=1, elva_name="elva")
# What decides the world, the tokenizer and the model's shape: a run folder keeps one value of each.
SHAPING_ARGS = ("preset", "seed", "world_seed", "n_train", "n_test", "vocab_size", "mbeir",
                "train_tasks", "mbeir_pool", "summary_field")
# What stage 3's console line shows (its log.jsonl keeps every value of the step).
ELVA_SHOWN = ("loss", "reward_mean", "R_rank", "top1", "tied_groups", "kl", "summary_len")


def build_parser() -> argparse.ArgumentParser:
    """The paper's knobs and the run's essentials, one flag each (study.py adds its variants)."""
    p = Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument_group("run").add_argument
    add("--preset", default=None, choices=list(TRAIN_PRESETS), help="default gpu on CUDA, else cpu")
    add("--out", default=None, help="output folder (default runs/<preset>)")
    add("--seed", type=int, default=0, help="seed of the world, the model and the sampling")
    add("--stages", default=None, help="text, contrastive, elva (default all; 2-3 with --mbeir)")
    add_run_flags(p)   # --resume, --device, --threads, --log_every, --profile, ... (runtime.py)
    add = p.add_argument_group("data: GrainWorld, or M-BEIR in UniIR's layout").add_argument
    add("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    add("--world_seed", type=int, default=None, help="GrainWorld's seed (default --seed)")
    add("--mbeir", default=None, help="an M-BEIR root: train on its train split, test on its test")
    add("--train_tasks", default="all", help="comma list of M-BEIR training tasks, or all")
    add("--mbeir_pool", default="union", choices=["union", "local"], help="M-BEIR's pool")
    add("--summary_field", default=None, help="an M-BEIR field holding a reference summary")
    add("--eval_tasks", default=None, help="M-BEIR tasks to evaluate (default: the trained ones)")
    add = p.add_argument_group("stage 1: text (Sec. 3.3); batch, lr, tau: stage 2's").add_argument
    add("--text_steps", type=int, default=None, help="optimizer steps of the text stage")
    add = p.add_argument_group("stage 2: contrastive (Sec. 3.3)").add_argument
    add("--steps", type=int, default=None, help="optimizer steps")
    add("--batch_size", type=int, default=None, help="queries per step, each with its positive")
    add("--lr", type=float, default=None, help="peak AdamW learning rate")
    add("--tau", type=float, default=0.05, help="InfoNCE temperature")
    add("--lm_weight", type=float, default=1.0, help="weight of the summaries' next-token loss")
    add("--summary_dropout", type=float, default=0.5, help="items embedded with no summary (ours)")
    add = p.add_argument_group("stage 3: ELVA (Sec. 3.4)").add_argument
    add("--init", default=None, help="start checkpoint (default <out>/contrastive)")
    add("--rl_steps", type=int, default=None, help="optimizer steps")
    add("--rl_batch", type=int, default=None, help="queries per step")
    add("--group_size", type=int, default=None, help="G: rollouts per query (paper 8)")
    add("--n_hard", type=int, default=None, help="filtered hard negatives per query (paper 50)")
    add("--n_rand", type=int, default=None, help="random negatives per query (paper 50)")
    add("--hard_threshold", type=float, default=0.95, help="hard negatives above this stage-2 "
        "cosine are dropped as likely false negatives")
    add("--rl_lr", type=float, default=1e-5, help="AdamW learning rate (paper 1e-6, 7B + LoRA)")
    add("--temperature", type=float, default=1.0, help="sampling temperature of the summaries")
    add("--clip_eps", type=float, default=0.2, help="PPO clip range of the ratio (TRL's epsilon)")
    add("--beta", type=float, default=0.2, help="KL coefficient to the reference (paper 0.2)")
    add("--alpha", "--margin_weight", dest="alpha", type=float, default=ALPHA,
        help="weight of R_Margin (paper 0.4)")
    add("--epsilon", "--rank_weight", dest="epsilon", type=float, default=EPSILON,
        help="weight of R_Rank (paper 0.6; not TRL's epsilon, which is --clip_eps)")
    add("--delta", type=float, default=DEFAULT_DELTA, help="margin of R_Margin")
    add("--gamma", default="auto", help="weight of R_Rank's negative term: auto or a number")
    add("--train_vision", action="store_true", help="train the vision tower (the paper freezes it)")
    add("--loss_norm", default="token", choices=["token", "sequence"], help="GRPO's mean")
    return p


def get_args(argv=None, parser=None):
    """Parse train.py's flags (or study.py's superset), fill in the preset, check every flag."""
    args = (parser or build_parser()).parse_args(argv)
    if args.world_seed is None:
        args.world_seed = args.seed
    return resolve_stage_args(args, TRAIN_PRESETS, COMMON, len(TASKS))


# --------------------------------------------------------------------------------------------------
# The data, behind one interface (data.Source): GrainWorld's in data.py, M-BEIR's in mbeir.py


def read_source(args, meta: dict | None = None) -> Source:
    """The training data, read and checked whole before any work: from the flags, or (stage 3)
    from the stage-2 checkpoint's config.json, so that ELVA trains on the data stage 2 saw."""
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
    fail("--init", args.init, "a checkpoint whose config.json has a 'world' or 'mbeir' section")


# --------------------------------------------------------------------------------------------------
# Stages 1 and 2 (Section 3.3): InfoNCE on the [RET] embeddings of teacher-forced reference
# summaries, plus the summaries' next-token loss, which teaches our from-scratch model to write
# summaries at all (Qwen2-VL already can). The paper's stages 1-2 embed at a fixed prompt token
# (LamRA's "in one word: <emb>"); ours embed at [RET] after the summary, so that one template serves
# all three stages.


def info_nce(eq: torch.Tensor, ec: torch.Tensor, tau: float, false_neg=None, target_offset=0):
    """L = -1/N sum_n log( exp(cos(e_q, e_c+)/tau) / sum_m exp(cos(e_q, e_cm)/tau) )   (Sec. 3.3)

    eq (N, D) and ec (M, D) or (N, M, D), unit vectors. ec (M, D): candidate n + target_offset is
    query n's positive; ec (N, M, D): candidate 0 of each row is. false_neg (N, M) masks candidates
    known to be relevant, so that a true match is never pushed away."""
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
    """An encoded batch with its reference summaries teacher-forced -> (embeddings (N, D),
    summary log-probs (N, T), LM mask (N, T)). drop (N,): rows embedded with no summary, out of
    the LM loss."""
    with phase("forward"), autocast():
        logp, h = model.token_logprobs(b, imgs, groups=2)   # 2 passes of like length: less padding
    lm_mask = b["gen_mask"] & ~drop.to(logp.device)[:, None]
    return model.ret_embedding(h, b["ret_pos"]), logp * lm_mask, lm_mask


def lm_loss(logp: torch.Tensor, lm_mask: torch.Tensor, args) -> torch.Tensor:
    """The summaries' next-token loss: the mean over the whole batch's summary tokens."""
    return -batch_mean(logp.sum(), lm_mask.sum(), args)


def stage2_loss(args, retriever, inputs: dict, autocast, device):
    """InfoNCE over in-batch negatives + lm_weight * next-token loss -> (loss, InfoNCE, LM loss).
    Items come as [B queries, their B positives, any extra negatives]; under torchrun every
    process's candidates take part (gather_candidates).

    Summary dropout (ours): with reference summaries a query and its positive often carry the same
    words (for i2i the same string), so InfoNCE could be met by reading the summary alone. Dropping
    the summaries of a random part of the items makes InfoNCE train perception too."""
    b, imgs = retriever.on_device(*inputs["encoded"])
    drop = torch.tensor(inputs["drop"])
    e, logp, lm_mask = teacher_forced_on(retriever.model, b, imgs, drop, autocast)
    B = inputs["n_queries"]
    ec, offset = gather_candidates(e[B:], args)                                # (candidates, D)
    false_neg = inputs["false_neg"].to(device)
    l_nce = info_nce(e[:B], ec, args.tau, false_neg, target_offset=offset)
    l_lm = lm_loss(logp, lm_mask, args)
    return l_nce + args.lm_weight * l_lm, l_nce, l_lm


def open_embedding_stage(args, source: Source, tok, device, name: str, steps: int, init):
    """A fresh model (seeded), or init's weights, and its AdamW; None if --out/name is complete."""
    torch.manual_seed(args.seed)
    model = elva.build_model(copy.deepcopy(elva.PRESETS[args.preset]), tok).to(device)
    if init is not None:
        model.load_state_dict(elva.load_checkpoint(init, device)[0].state_dict())
        print(f"{name}: starts from {init}")
    compile_blocks(model, args)
    opt = adamw(model.parameters(), args.lr, args.weight_decay, device, name, Path(args.out) / name)
    meta = {**source.meta, "args": serializable(args), "stage": name}
    return open_stage(args, name, steps, elva.Retriever(model, tok), opt, meta, device, init)


def embedding_stage(args, source: Source, tok, device, autocast, name: str, steps: int, make_inputs,
                    init: Path | None, what: str):
    """Stages 1 and 2: per step the global batch (make_inputs), this process's share, the loss, the
    warm-up + cosine learning rate, a clipped AdamW step; the loop, logs and checkpoints are
    runtime.run_steps'."""
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
        # the loss: InfoNCE over in-batch negatives (true matches masked) + next-token loss
        loss, l_nce, l_lm = stage2_loss(args, retriever, batch, autocast, device)
        # the update: warm-up + cosine schedule, clipped AdamW step
        lr = set_lr(opt, lr_at(step, steps, args.lr, args.warmup))
        gnorm = optimizer_step(opt, retriever.model, loss, args)
        # the record: tensors stay on the device until the log line reads them
        return {"loss": loss.detach(), "infonce": l_nce.detach(), "lm": l_lm.detach(), "lr": lr,
                "grad_norm": gnorm.detach(), "masked_false_neg": int(batch["false_neg"].sum())}

    run_steps(args, stage, inputs, step_fn)
    print(f"{name}: saved {stage.folder}")


def text_stage(args, source: Source, tok, device, autocast):
    """Stage 1 (Sec. 3.3, after LamRA), in miniature: language-only InfoNCE on NLI-style triplets
    (data.nli_triplet): a caption, an entailed rewording (the positive), the caption with one grain
    contradicted (a hard negative), and in-batch negatives; stage 2's model, template and loss."""
    embedding_stage(args, source, tok, device, autocast, "text", args.text_steps,
                    data.make_text_inputs, None, "NLI triplets")


def contrastive_stage(args, source: Source, tok, device, autocast):
    """Stage 2 (Sec. 3.3) on the source's batches, from stage 1's weights when the run has it."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    embedding_stage(args, source, tok, device, autocast, "contrastive", args.steps,
                    source.contrastive_inputs, init, "queries")


# --------------------------------------------------------------------------------------------------
# Stage 3: ELVA (Section 3.4). Negatives mined by the stage-2 model, then GRPO on generated
# embeddings.


def make_rl_inputs(args, instances, step: int) -> list:
    """Stage 3's global batch: rl_batch instances drawn from the step's seed."""
    return random.Random(f"{args.seed}-rl-batch-{step}").sample(instances, args.rl_batch)


@dataclass
class Rollout:
    """A GRPO rollout batch: B instances x G rollouts x K = 2 + N items (query, positive, N
    negatives): S = B * G * K sequences in (instance, rollout, item) order. An item's G rollouts
    share its prompt, held once (U = B * K prompts); per sequence, the summary part: summary,
    [RET]."""
    batch: dict             # prompt_tokens / prompt_attn (U, P), images, index (S,): each row's
                            # prompt; tokens / attn / gen_mask (S, Ts), ret_pos (S,): the summary
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
    index = torch.arange(B, device=device)[:, None, None] * K + torch.arange(K, device=device)
    return index.expand(B, G, K).reshape(-1)


def rollout_scores(e: torch.Tensor, backend: str = "auto"):
    """e (B, G, K, D) -> each rollout's cosines of its query to its candidates and their ranks, the
    positive's by the reward's rule (B, G, K - 1) each: kernels.cosine_ranks, fused on a GPU."""
    B, G, K, D = e.shape
    q, c = e[:, :, 0].reshape(B * G, D), e[:, :, 1:].reshape(B * G, K - 1, D)
    s, r = cosine_ranks(q, c, positive_last=True, backend=backend)
    return s.view(B, G, K - 1), r.view(B, G, K - 1)


def rollout(args, policy: elva.Retriever, made: dict, gen: torch.Generator, autocast) -> Rollout:
    """The paper's action (Sec. 3.4): per instance and rollout, sample a summary of every item --
    the query's, the positive's, each negative's -- then embed and score them (embed_rollout).
    Each prompt is read once; its G rollouts expand its KV cache."""
    B, G, K = len(made["batch"]), args.group_size, 2 + len(made["batch"][0][1])
    with phase("data"):   # the U = B * K items' prompts (U, P), left-padded, made ahead
        pb, images = policy.on_device(*made["encoded"])
    index = rollout_index(B, G, K, pb["tokens"].device)                        # (S,)
    with phase("generate"), autocast():
        summ, ended = policy.model.generate(pb["tokens"], pb["attn"], images, index=index,
                                            temperature=args.temperature, generator=gen,
                                            return_ended=True)
    return embed_rollout(args, policy, pb, images, (B, G, K), summ, ended, autocast)


def embed_rollout(args, policy, pb: dict, images, shape: tuple, summaries, ended, autocast):
    """The sampled summaries teacher-forced after their shared prompts, with gradient (its log-probs
    serve the update: on-policy, no second forward), embedded at [RET], and each rollout's list
    scored and ranked -> Rollout. A [RET] forced after max_summary_len tokens was not sampled: it is
    left out of `sampled` (no advantage, no KL)."""
    B, G, K = shape
    dev = pb["tokens"].device
    index = rollout_index(B, G, K, dev)                                        # (S,)
    sb = data.collate_summaries(summaries, policy.enc.pad, policy.enc.ret)
    sb = {k: v.to(dev) for k, v in sb.items()}
    rb = {"prompt_tokens": pb["tokens"], "prompt_attn": pb["attn"], "images": images,
          "index": index, **sb}
    forced = ~torch.tensor(ended, device=dev)
    sampled = sb["gen_mask"].clone()
    sampled[torch.arange(len(summaries), device=dev)[forced], sb["ret_pos"][forced]] = False
    with phase("forward"), autocast():
        logp, h = policy.model.shared_prefix_logprobs(rb, args.temperature)
    # e keeps its graph: GRPO's loss reaches the embeddings only through the log-probs, a loss on
    # the embeddings themselves directly (study.py's anchor)
    e = policy.model.ret_embedding(h, rb["ret_pos"]).view(B, G, K, -1)         # (B, G, K, D)
    with phase("score"), torch.no_grad():
        scores, ranks = rollout_scores(e.detach())                             # (B, G, K - 1) each
    return Rollout(batch=rb, sampled=sampled, logp=logp.float(), e=e, scores=scores, ranks=ranks,
                   summaries=summaries)


def grpo_step(args, policy: elva.Retriever, ref: elva.Retriever, opt, made: dict, gen,
              autocast) -> dict:
    """ELVA's GRPO step (Section 3.4), in the paper's order:
      1. rollout    G sampled summaries of every item -> [RET] embeddings -> each rollout's ranking
      2. reward     R_total = alpha R_Margin + epsilon R_Rank of each rollout's list, no gradient
      3. advantage  A = (R - mean) / (std + eps) over the query's G rollouts, for all its summaries
      4. loss       PPO-clipped policy gradient on the sampled tokens + beta * KL(k3) to stage 2
      5. update     clipped AdamW step
    Kept: the clipped objective, the KL to the frozen stage-2 model. Dropped: the entropy bonus and
    the value function (GRPO has none). On-policy -- one update per rollout batch, as here -- the
    ratio is exactly 1 and the clip never acts: the gradient is REINFORCE's with the group mean as
    baseline, plus the KL term. The clip stays so that the objective is GRPO's as written;
    study.py's --num_iterations reuses a batch and makes it act."""
    # 1. rollout
    ro = rollout(args, policy, made, gen, autocast)
    B, G, K = ro.shape
    # 2. reward, from each rollout's scores and ranks alone
    R, parts = total_reward(ro.scores, args.alpha, args.epsilon, args.delta, args.gamma,
                            return_parts=True, ranks=ro.ranks)                 # (B, G)
    # 3. group advantage, one per rollout, the same for each of its K summaries
    A = group_advantages(R)[:, :, None].expand(B, G, K).reshape(-1)           # (S,)
    # 4. loss: the rollout's own log-probs are the "old" ones; stage 2 is the KL reference
    with phase("reference"), torch.no_grad(), autocast():
        ref_logp, _ = ref.model.shared_prefix_logprobs(ro.batch, args.temperature)
    n_tokens = global_tokens(ro.sampled, args, args.loss_norm)               # None without torchrun
    loss, info = grpo_loss(ro.logp, ro.logp.detach(), ref_logp.float(), A.to(ro.logp.device),
                           ro.sampled, args.clip_eps, args.beta, n_tokens=n_tokens,
                           norm=args.loss_norm)
    # 5. update
    optimizer_step(opt, policy.model, loss, args)
    # the record (tensors, read from the device once per log line)
    R = R.float()
    tied = (R.max(1).values - R.min(1).values) < 1e-6                      # groups with no gradient
    lengths = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32)
    return {"loss": loss.detach(), "reward_mean": R.mean(), "reward_std": R.std(),
            "R_margin": parts["margin"].float().mean(), "R_rank": parts["rank"].float().mean(),
            "top1": (parts["pos_rank"] == 1).float().mean(), "tied_groups": tied.float().mean(),
            "kl": info["kl"], "clip_low": info["clip_low"], "clip_high": info["clip_high"],
            "summary_len": lengths.mean()}


@dataclass
class ElvaSetup:
    stage: object           # runtime.Stage: the policy (stage.retriever), its AdamW, folder, start
    ref: elva.Retriever     # the frozen stage-2 model: KL reference and negative miner
    instances: list         # the mined RL instances [(Query, [negative Items])]


def open_elva_stage(args, device, autocast) -> ElvaSetup | None:
    """Stage 3's set-up: the policy starts as the stage-2 model (--init), which also stays frozen as
    the KL reference and mines the negatives. None if --out/<elva_name> is complete."""
    init = Path(args.init or Path(args.out) / "contrastive")
    ref = elva.Retriever.from_pretrained(init, device)
    source = read_source(args, ref.meta)                # stage 2's data; --seed varies only RL here
    model = copy.deepcopy(ref.model).train()
    for p in ref.model.parameters():
        p.requires_grad_(False)
    # the paper freezes the vision encoder and trains the language model (LoRA at 7B; our decoder is
    # small enough to train whole): the vision tower and projector stay, unless --train_vision
    if not args.train_vision:
        for p in model.vision_parameters():
            p.requires_grad_(False)
    compile_blocks(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, args.rl_lr, 0.0, device, args.elva_name, Path(args.out) / args.elva_name)
    meta = {**source.meta, "args": serializable(args), "stage": "elva", "init": str(init)}
    stage = open_stage(args, args.elva_name, args.rl_steps, elva.Retriever(model, ref.tok), opt,
                       meta, device, init)
    if stage is None:
        return None
    # the RL instances: queries with balanced negatives mined by the stage-2 model (Sec. 3.4)
    t0 = time.time()
    instances = source.rl_instances(args, source.data, ref, autocast)
    C = 1 + args.n_hard + args.n_rand
    gamma = auto_gamma(C) if args.gamma is None else args.gamma
    n_train = sum(p.numel() for p in trainable) / 1e6
    print(f"{args.elva_name}: mined {len(instances)} instances ({args.n_hard} hard + {args.n_rand} "
          f"random negatives) in {time.time() - t0:.0f}s; {args.rl_steps} steps x {args.rl_batch} "
          f"queries x G={args.group_size}; alpha {args.alpha}, epsilon {args.epsilon}, delta "
          f"{args.delta}, gamma {gamma:.4f} (C = {C}); trains {n_train:.2f}M parameters")
    return ElvaSetup(stage, ref, instances)


def rl_inputs(args, instances, stage, device):
    """The steps' rollout batches: drawn from `instances`, this process's share, prompts encoded."""
    encode = functools.partial(data.encode_rollout, stage.retriever.enc,
                               stage.retriever.prompt_limit)
    return step_inputs(args, functools.partial(make_rl_inputs, args, instances), my_share, encode,
                       stage.start, stage.steps, device)


def elva_stage(args, device, autocast):
    """Stage 3: rl_steps GRPO steps from the stage-2 model, each step's sampling seeded."""
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


def main(argv=None):
    """Stage 1 -> stage 2 -> stage 3 -> evaluation (eval.py, in its own process)."""
    args = get_args(argv)
    eval_tasks = None
    if args.mbeir:
        import mbeir   # the M-BEIR tasks to evaluate are checked before any training
        eval_tasks = mbeir.eval_tasks(args)
    device, autocast, threads = start_run(args, SHAPING_ARGS)
    t0 = time.time()
    if "contrastive" in args.stages:
        source, tok = source_tokenizer(args, read_source(args), t0)
        if "text" in args.stages:
            text_stage(args, source, tok, device, autocast)
        contrastive_stage(args, source, tok, device, autocast)
    if "elva" in args.stages:
        elva_stage(args, device, autocast)
    finish_run(args, device, threads, t0, eval_tasks)


if __name__ == "__main__":
    one_line_errors(main)
