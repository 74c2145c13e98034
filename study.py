"""
The study: our own variants of stages 2 and 3, the equal-compute control, and the study's runs --
everything here is ours, not the paper's. train.py is the paper; this file calls its functions with
other arguments.

    python study.py run [train.py's flags] [a variant's flags]  # the pipeline with variants
    python study.py runs INIT OUT [--only REGEX] [--jobs 2]     # the study's stage-3 runs
    python study.py audit --ckpt runs/cpu/contrastive           # does the reward pick better words?
    python study.py audit --ckpt ... --sample_candidates        # ... candidates' words sampled too
    python study.py grains --ckpt STAGE2 ELVA                   # where greedy summaries err
    python study.py eval --ckpt RUN --scorer STAGE2             # a frozen-scorer run's table
    python study.py transfer RUN...                             # the transfer probe's table
    python study.py compare RUN_A RUN_B                         # the same, number for number?
    python study.py run --help                                  # every flag

Why a study: the paper's claim (Section 3.4) is that GRPO on its ranking rewards teaches what
InfoNCE misses. In this miniature the paper's configuration does not beat the control
(docs/results.md), and these variants are how we find out which step fails. Each is off by default;
`python study.py run` with none of them is `python train.py`.

The variants (stage: what it changes -- why):
  --control                 stage 3: stage 2's loss continued on the same candidate sets and steps
                            instead of GRPO (the equal-compute control) -- without it no claim about
                            ELVA means anything
  --reward toy|length       stage 3: a reward known to be learnable, colour words in the summaries /
                            minus their length -- checks that GRPO itself can climb (the ladder)
  --reward rank|zscore|ndcg stage 3: a scale-free reward (reward.py): the rank alone, R_total on
                            standardised scores, graded NDCG with near misses at half credit --
                            R_Rank pays for inflating scores
  --reward pool             stage 3: the positive's rank in a whole training pool embedded by the
                            stage-2 model -- denser than a rank among 9 candidates
  --best_of_g               stage 3: the next-token loss on the group's best query summary -- the
                            audit finds better summaries within sampling reach; can a policy learn
                            them?
  --credit sequence         stage 3: each summary credited for its own part of the ranking
                            (reward.sequence_credit) -- in the paper a rollout's 2 + N summaries
                            share one reward
  --advantage mean          stage 3: the group's mean as baseline, no division by its std
  --sample query            stage 3: only the query's summary is sampled, candidates keep their
                            greedy ones -- a group's rewards then differ by the query's words alone
  --empty_member            stage 3: the last rollout of each group writes no query summary -- can
                            GRPO learn to write nothing where words do not help?
  --scorer frozen           stage 3: the frozen stage-2 model embeds the rollouts (the policy only
                            writes) -- a stationary reward, as retrieval-RL systems use
  --rl_instances N          stage 3: a fixed set of N training instances -- where optimisation
                            turns into memorisation
  --probe_transfer H        stage 3: after each update, the reward of the same batch re-sampled and
                            of H held-out instances (TransferProbe) -- does an update pay elsewhere?
  --anchor W                stage 3: + W * mean cosine distance between policy and stage-2
                            embeddings of the same words -- holds the map from words to embedding
  --pathwise W              stage 3: + -W * R_total through the embeddings -- a dense gradient
  --num_iterations N        stage 3: N PPO-style updates per rollout batch (the clip acts)
  --summary_dropout_end P   stage 2: summary dropout annealed linearly to P -- [RET] learns to read
                            words late on
  --own_summaries F         stage 2: from --own_from on, a fraction F of the kept summaries are the
                            model's own greedy ones (no LM loss) -- stage 2 then reads the words it
                            writes at evaluation and in RL
  --n_train, --n_test, --rl_queries, --rl_pool_scenes, --eval_queries, --mrbench_per_task,
  --weight_decay, --warmup, --elva_name: sizes and names train.py takes from its preset
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import data
import elva
import train
from reward import (group_advantages, grpo_loss, ndcg_reward, rank_reward, ranking_reward,
                    sequence_credit, total_reward, zscore_reward)
from runtime import (Parser, check_fractions, default_threads, fail, finish_run, global_tokens,
                     log_records, lr_at, my_part, my_share, one_line_errors, optimizer_step, phase,
                     resolve_device, run_steps, set_lr, source_tokenizer, start_run, step_inputs,
                     step_seed, world_of, write_json)


# --------------------------------------------------------------------------------------------------
# Stage 2 variants (ours): their own batches and loss, in train.py's stage-2 loop pieces


def dropout_at(args, step: int) -> float:
    """Stage 2's summary-dropout rate at `step`: constant, or (--summary_dropout_end) annealed
    linearly."""
    if args.summary_dropout_end is None:
        return args.summary_dropout
    frac = step / max(1, args.steps - 1)
    return args.summary_dropout + (args.summary_dropout_end - args.summary_dropout) * frac


def stage2_variant_inputs(args, world, step: int) -> dict:
    """data.make_stage2_inputs at the step's dropout rate (--summary_dropout_end), with the items
    whose summary is the model's own (--own_summaries, from --own_from of the steps on) flagged
    `own`."""
    at_step = copy.copy(args)
    at_step.summary_dropout = dropout_at(args, step)
    batch = data.make_stage2_inputs(at_step, world, step)
    if args.own_summaries > 0 and step >= args.own_from * args.steps:
        own_rng = random.Random(f"{args.seed}-own-{step}")
        own = [own_rng.random() < args.own_summaries for _ in range(2 * args.batch_size)]
        batch["own"] = [o and not d for o, d in zip(own, batch["drop"])]
    return batch


def encode_variant_inputs(enc, limit: int, part: dict) -> dict:
    """data.encode_pairs, keeping the items, instructions and `own` flags the variant's loss
    reads."""
    return {**data.encode_pairs(enc, limit, part), "items": part["items"],
            "instr": part["instructions"],
            "own": part.get("own")}


def stage2_variant_loss(args, retriever, inputs, autocast, device):
    """--own_summaries: stage 2 reading its own words. Stage 2 learns its embedding from
    reference summaries but is evaluated (and, in stage 3, rewarded) on the summaries it
    generates; the items flagged `own` get the model's current greedy summary instead, so that
    InfoNCE also teaches the [RET] state to use -- or discount -- the words the model really
    writes. Those rows stay out of the next-token loss (they are not references)."""
    if not any(inputs.get("own") or ()):
        return train.stage2_loss(args, retriever, inputs, autocast, device)
    items, instr, own, drop = inputs["items"], inputs["instr"], inputs["own"], inputs["drop"]
    idx = [i for i, o in enumerate(own) if o]
    with torch.no_grad(), phase("generate"), autocast():
        written = retriever.summarise([items[i] for i in idx], [instr[i] for i in idx])
    summaries = retriever.enc.reference_summaries(items, drop)
    for i, s in zip(idx, written):
        summaries[i] = s
    with phase("data"):
        encoded = retriever.batch(items, instr, summaries)
    no_lm = [d or o for d, o in zip(drop, own)]
    return train.stage2_loss(args, retriever, {**inputs, "encoded": encoded, "drop": no_lm},
                             autocast, device)


def variant_contrastive_stage(args, source, tok, device, autocast):
    """Stage 2 with --summary_dropout_end / --own_summaries: train.py's set-up and loop, these
    batches and loss."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    stage = train.open_embedding_stage(args, source, tok, device, "contrastive", args.steps, init)
    if stage is None:
        return
    ret, opt = stage.retriever, stage.opt
    ret.model.train()
    make = functools.partial(stage2_variant_inputs, args, source.data)
    encode = functools.partial(encode_variant_inputs, ret.enc, ret.prompt_limit)
    inputs = step_inputs(args, make, my_part, encode, stage.start, args.steps, device)

    def step_fn(step: int, batch: dict) -> dict:
        loss, l_nce, l_lm = stage2_variant_loss(args, ret, batch, autocast, device)
        lr = set_lr(opt, lr_at(step, args.steps, args.lr, args.warmup))
        gnorm = optimizer_step(opt, ret.model, loss, args)
        return {"loss": loss.detach(), "infonce": l_nce.detach(), "lm": l_lm.detach(), "lr": lr,
                "grad_norm": gnorm.detach(), "masked_false_neg": int(batch["false_neg"].sum())}

    run_steps(args, stage, inputs, step_fn)


# --------------------------------------------------------------------------------------------------
# Stage 3 (ours): study_step is train.grpo_step's five steps, built from train.py's pieces, with the
# variant each flag asks for at its step and the study's diagnostics in the log.


def sample_queries_only(args, policy, pb, images, index, gen, K):
    """--sample query (step 1's sampling): sample the G summaries of each query; each candidate
    gets its greedy summary, the same in every rollout (and not trained). Within a group the
    candidates' embeddings are then identical, so the rewards differ by the query's words alone:
    each advantage credits exactly one summary. -> (summaries, ended, fixed (S,) bool: rows whose
    summary was not sampled), in (instance, rollout, item)."""
    is_query = index % K == 0                                         # (S,): item 0 of each rollout
    q_rows = is_query.nonzero()[:, 0]
    sampled, s_ended = policy.model.generate(pb["tokens"], pb["attn"], images,
                                             temperature=args.temperature,
                                             generator=gen, return_ended=True, index=index[q_rows])
    greedy, g_ended = policy.model.generate(pb["tokens"], pb["attn"], images, temperature=0.0,
                                            return_ended=True)
    summ, ended, it = [], [], iter(zip(sampled, s_ended))
    for s, u in enumerate(index.tolist()):
        a, b = next(it) if is_query[s] else (greedy[u], g_ended[u])
        summ.append(a)
        ended.append(b)
    return summ, ended, ~is_query


def study_rollout(args, policy, made: dict, gen, autocast) -> train.Rollout:
    """Step 1: train.rollout, or with --sample query the queries' summaries alone sampled, or with
    --empty_member the last rollout of each group writing no query summary (an off-policy member:
    can GRPO learn to write nothing where words do not help?)."""
    if args.sample != "query" and not args.empty_member:
        return train.rollout(args, policy, made, gen, autocast)
    batch = made["batch"]
    B, G, K = len(batch), args.group_size, 2 + len(batch[0][1])
    pb, images = policy.on_device(*made["encoded"])
    index = train.rollout_index(B, G, K, pb["tokens"].device)
    fixed = torch.zeros(len(index), dtype=torch.bool, device=index.device)
    with phase("generate"), autocast():
        if args.sample == "query":
            summ, ended, fixed = sample_queries_only(args, policy, pb, images, index, gen, K)
        else:
            summ, ended = policy.model.generate(pb["tokens"], pb["attn"], images, index=index,
                                                temperature=args.temperature, generator=gen,
                                                return_ended=True)
    if args.empty_member:
        for b in range(B):
            row = (b * G + G - 1) * K                                           # its query summary
            summ[row], ended[row] = [], True
    ro = train.embed_rollout(args, policy, pb, images, (B, G, K), summ, ended, autocast)
    ro.sampled[fixed] = False                                   # the candidates' words: not trained
    return ro


def scored_rollout(args, policy, ref, made: dict, gen, autocast):
    """Step 1 and the reference's pass over the same words -> (rollout, reference log-probs (S, Ts),
    reference embeddings (S, D)). --scorer frozen: the rollout's embeddings, scores and ranks come
    from the frozen stage-2 model, so the policy only writes the words and the reward is stationary
    (as the retrieval-RL systems that score with a separate frozen model)."""
    ro = study_rollout(args, policy, made, gen, autocast)
    with phase("reference"), torch.no_grad(), autocast():
        ref_logp, ref_h = ref.model.shared_prefix_logprobs(ro.batch, args.temperature)
        e_ref = ref.model.ret_embedding(ref_h, ro.batch["ret_pos"])            # (S, D)
    if args.scorer == "frozen":
        e = e_ref.view(ro.e.shape)
        scores, ranks = train.rollout_scores(e)
        ro = dataclasses.replace(ro, e=e, scores=scores, ranks=ranks)
    return ro, ref_logp, e_ref


def reward_weights(args) -> dict:
    """The paper's R_total constants, as reward.total_reward takes them."""
    return dict(alpha=args.alpha, epsilon=args.epsilon, delta=args.delta, gamma=args.gamma)


def toy_reward(texts: list[str]) -> float:
    """A verifiable toy reward for checking GRPO itself: the fraction of colour words among
    summary words."""
    words = [w for t in texts for w in t.replace(";", " ").split()]
    return sum(w in data.COLORS for w in words) / max(1, len(words))


def one_grain_apart(a, b) -> bool:
    """Scenes a and b differ by exactly one of GrainWorld's edits (data.scene_edit: an attribute,
    a binding swap, a relation swap)."""
    return a is not None and b is not None and b in data.edit_neighbours(a)


def grain_gains(query, negatives) -> torch.Tensor:
    """NDCG gains of an instance's candidate list (positive, negatives): 1 for the positive, 0.5
    for a negative one grain from the positive's scene (GrainWorld knows), else 0. -> (C,)"""
    pos = query.positive.scene
    return torch.tensor([1.0] + [0.5 if one_grain_apart(c.scene, pos) else 0.0 for c in negatives])


def study_reward(args, ro: train.Rollout, batch, policy) -> tuple[torch.Tensor, dict]:
    """Step 2 (--reward): the paper's R_total, or ours -- toy / length (lexical: a reward GRPO
    can surely climb, from the summaries alone: the fraction of colour words / minus the mean
    summary length), rank / zscore / ndcg (scale-free, reward.py), pool (the rank in a whole
    training pool). The paper's parts are logged always. -> (R (B, G), parts)"""
    w = reward_weights(args)
    if args.reward == "paper":
        return total_reward(ro.scores, **w, return_parts=True, ranks=ro.ranks)
    B, G, K = ro.shape
    s = ro.scores.cpu()                                                        # (B, G, C)
    if args.reward == "toy":
        texts = [policy.enc.decode(x) for x in ro.summaries]
        R = torch.tensor([toy_reward(texts[i * K:(i + 1) * K]) for i in range(B * G)]).view(B, G)
    elif args.reward == "length":
        R = -torch.tensor([len(x) for x in ro.summaries], dtype=torch.float32).view(B, G, K).mean(2)
    elif args.reward == "rank":
        R = rank_reward(s)
    elif args.reward == "zscore":
        R = zscore_reward(s, **w)
    elif args.reward == "ndcg":
        gains = torch.stack([grain_gains(q, n) for q, n in batch])              # (B, C)
        R = ndcg_reward(s, gains[:, None, :])
    else:
        R = pool_reward(args, ro, batch)
    _, parts = total_reward(s, **w, return_parts=True)                      # does the ranking move?
    return R, parts


# --reward pool: per stage-2 checkpoint, {task: (pool items, their stage-2 embeddings)}
_POOLS: dict = {}


def training_pools(args) -> dict:
    """--reward pool's pools, made once per run: per task a training pool (train scenes and their
    one-grain siblings, as mining draws them, from another seed) embedded by the frozen stage-2
    model (--init)."""
    init = str(args.init or Path(args.out) / "contrastive")
    if init not in _POOLS:
        ref = elva.Retriever.from_pretrained(init)
        world = data.GrainWorld(data.WorldConfig(**ref.meta["world"]))
        rng = random.Random(f"{args.seed}-pool-reward")
        pools = {}
        for task in data.TASKS:
            items = world.rl_pool(task, args.rl_pool_scenes, rng)
            e = ref.embed_items(items, [None] * len(items), progress=f"pool reward: {task}")[0]
            pools[task] = (items, e)
        _POOLS[init] = pools
    return _POOLS[init]


def pool_rank(eq: torch.Tensor, ep: torch.Tensor, relevant: torch.Tensor,
              s_pos: torch.Tensor) -> torch.Tensor:
    """The positive's rank in a pool, by the reward's rule: 1 + #{non-relevant j: cos(q, p_j) >=
    the best of the positive's own score s_pos and the relevant pool items' scores}. eq (G, D)
    unit, ep (P, D) unit, relevant (P,) bool, s_pos (G,). -> (G,) int64"""
    s = eq @ ep.T                                                              # (G, P)
    best = torch.maximum(s_pos, s.masked_fill(~relevant, float("-inf")).max(1).values)   # (G,)
    return 1 + ((s >= best[:, None]) & ~relevant).sum(1)


def pool_reward(args, ro: train.Rollout, batch) -> torch.Tensor:
    """--reward pool: 1 / (1 + ln r), r the positive's rank among a whole training pool
    (training_pools) rather than among the instance's 2 + N candidates -- denser than a rank
    among 9, and closest to the evaluation's metric. The query is the rollout's (policy)
    embedding; the pool keeps the stage-2 embeddings; the rollout's own positive embedding counts
    as relevant too, so a query whose positive is not in the pool still has one. -> (B, G)"""
    pools = training_pools(args)
    e = ro.e.detach().float().cpu()                                            # (B, G, K, D)
    R = []
    for b, (q, _) in enumerate(batch):
        items, ep = pools[q.task]
        relevant = torch.tensor([data.relevant(q.task, q.item, c) for c in items])          # (P,)
        s_pos = (e[b, :, 0] * e[b, :, 1]).sum(-1)                                           # (G,)
        r = pool_rank(e[b, :, 0], ep.cpu(), relevant, s_pos)
        R.append(1.0 / (1.0 + torch.log(r.float())))
    return torch.stack(R)                                                      # (B, G)


def study_advantages(args, ro: train.Rollout, R: torch.Tensor) -> torch.Tensor:
    """Step 3 -> (S,) advantages in (instance, rollout, item) order: the paper's group advantage
    shared by a rollout's K summaries, or ours -- --credit sequence: each summary's own credit
    (reward.sequence_credit), normalised over the group per item; --best_of_g: best-of-G
    distillation as a one-hot advantage: the rollout with the group's highest reward gets
    A = G on its query summary, every other summary 0 (a group whose rewards all tie: 0), so that
    the clipped loss is about the mean next-token loss of the kept summaries -- rejection sampling
    by the reward, iterated on-policy."""
    B, G, K = ro.shape
    if args.best_of_g:
        A = torch.zeros(B, G, K)
        best = R.argmax(1)                                                     # (B,)
        live = (R.max(1).values - R.min(1).values) >= 1e-6                     # (B,)
        A[torch.arange(B)[live], best[live], 0] = float(G)
        return A.reshape(-1)
    if args.advantage == "mean":   # the group's mean as baseline, no division by its std
        A = R - R.mean(dim=1, keepdim=True)                                    # (B, G)
        return A[:, :, None].expand(B, G, K).reshape(-1)
    if args.credit == "sequence":
        en = ro.e.detach().float().cpu()                                       # (B, G, K, D)
        S = torch.einsum("bqd,bgjd->bqgj", en[:, :, 0], en[:, :, 1:])         # (B, G', G, K - 1)
        credit = sequence_credit(S, **reward_weights(args))                    # (B, G, K)
        A = group_advantages(credit.permute(0, 2, 1).reshape(-1, G))           # (B * K, G)
        return A.view(B, K, G).permute(0, 2, 1).reshape(-1)
    return group_advantages(R)[:, :, None].expand(B, G, K).reshape(-1)


def pathwise_loss(args, e: torch.Tensor) -> torch.Tensor:
    """--pathwise w (added at step 4): R_total is differentiable almost everywhere in the scores,
    so -w * R_total's gradient through the embeddings e (B, G, K, D) of the sampled summaries
    joins GRPO's."""
    scores = train.rollout_scores(e, backend="torch")[0]                       # differentiable
    return -args.pathwise * total_reward(scores, **reward_weights(args)).mean()


def anchor_loss(args, e: torch.Tensor, e_ref: torch.Tensor) -> torch.Tensor:
    """--anchor w (added at step 4): w * mean(1 - cos(policy embedding, stage-2 embedding)) over
    the rollout's sequences, the same (input, sampled summary) pairs through both models. GRPO's
    gradient only sees the words' log-probs, but the same weights make the embeddings, so each
    update also moves the map from words to embeddings and the reward the next rollout sees
    shifts under the policy (the ladder: at lr 1e-3 the paper's reward falls). The anchor holds
    that map near stage 2's, so that what changes is which words are written."""
    return args.anchor * (1 - (e.reshape(e_ref.shape) * e_ref).sum(-1)).mean()


def study_step(args, policy, ref, opt, made, gen, autocast, step: int, probe=None) -> dict:
    """The study's stage-3 step: train.grpo_step's five steps with the variants (--sample,
    --scorer, --reward, --advantage, --credit, --best_of_g, --anchor, --pathwise, --num_iterations),
    the diagnostics in the log, and with --probe_transfer the transfer probe after the update."""
    batch = made["batch"]
    # 1. rollout, and the reference's pass over the same words (the KL; the anchor's target)
    ro, ref_logp, e_ref = scored_rollout(args, policy, ref, made, gen, autocast)
    B, G, K = ro.shape
    # 2. reward
    R, parts = study_reward(args, ro, batch, policy)                          # (B, G)
    # 3. advantage
    A = study_advantages(args, ro, R).to(ro.logp.device)                      # (S,)
    # 4. loss
    old_logp = ro.logp.detach()
    logp, e = ro.logp, ro.e
    n_tokens = global_tokens(ro.sampled, args, args.loss_norm)
    for it in range(args.num_iterations):
        if it > 0:   # a further update on the same rollouts (PPO-style reuse: the ratio leaves 1)
            with autocast():
                logp, h = policy.model.shared_prefix_logprobs(ro.batch, args.temperature)
            e = policy.model.ret_embedding(h, ro.batch["ret_pos"]).view(B, G, K, -1)
        loss, info = grpo_loss(logp.float(), old_logp, ref_logp.float(), A, ro.sampled,
                               args.clip_eps, args.beta, n_tokens=n_tokens, norm=args.loss_norm)
        if args.pathwise > 0:
            loss = loss + pathwise_loss(args, e)
        if args.anchor > 0:
            loss = loss + anchor_loss(args, e, e_ref)
        # 5. update
        optimizer_step(opt, policy.model, loss, args)
    rec = {"loss": loss.item(), **diagnostics(args, ro, batch, R, parts, A, info, policy, e_ref)}
    if probe is not None:
        rec.update(probe.after_update(policy, ref, made, step, rec["reward_mean"], autocast))
    return rec


class TransferProbe:
    """--probe_transfer H: after each update, does it pay beyond its own rollouts? delta_same: the
    reward of the step's own instances re-sampled with the step's seed after the update, minus the
    step's reward (the same samples' seed: a paired difference); delta_other: the reward of H fixed
    held-out training instances (never trained on) now minus at the previous probe (over the last
    --probe_every updates), each time sampled with one fixed seed. The run's t of each (study.py
    transfer) says whether an update that pays on its own instances pays anywhere else."""

    def __init__(self, args, heldout: list, stage, autocast):
        self.args, self.every = args, args.probe_every
        self.made = data.encode_rollout(stage.retriever.enc, stage.retriever.prompt_limit, heldout)
        self.seed = args.seed * 100003 + 99991                  # one seed for every held-out roll
        self.other = None

    def reward(self, policy, ref, made, seed: int, autocast) -> float:
        gen = torch.Generator(device=policy.device).manual_seed(seed)
        with torch.no_grad():
            ro, _, _ = scored_rollout(self.args, policy, ref, made, gen, autocast)
            R, _ = study_reward(self.args, ro, made["batch"], policy)
        return R.float().mean().item()

    def after_update(self, policy, ref, made, step: int, before: float, autocast) -> dict:
        if step % self.every:
            return {}
        if self.other is None:   # the held-out reward before the first probed update
            self.other = self.reward(policy, ref, self.made, self.seed, autocast)
        same = self.reward(policy, ref, made, step_seed(self.args, step), autocast)
        other = self.reward(policy, ref, self.made, self.seed, autocast)
        rec = {"same_after": same, "delta_same": same - before, "other": other,
               "delta_other": other - self.other}
        self.other = other
        return rec


def group_corr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over groups (rows) of Pearson's r; a group where either side is constant counts 0."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    den = x.norm(dim=1) * y.norm(dim=1)
    r = torch.where(den > 1e-12, (x * y).sum(1) / den.clamp(min=1e-12), torch.zeros_like(den))
    return r.mean().item()


def diagnostics(args, ro: train.Rollout, batch, R, parts, A, info, policy, e_ref) -> dict:
    """What one stage-3 log line of the study says about the step's signal. `tied_groups`: groups
    whose G rewards all tie (no gradient). `corr_len` / `corr_exact`: the mean, over groups, of
    the correlation between a rollout's reward and its summaries' mean length / whether its query
    summary is exactly the reference -- what the reward pays for. `pg` / `kl_term`: the
    policy-gradient part of the loss and beta * KL. `adv_query`: the share of the batch's
    |advantage| mass (over sampled tokens) on query summaries rather than candidate summaries.
    `drift`: the mean cosine distance between the policy's and the stage-2 model's (e_ref)
    embeddings of the same sampled words -- how far the map from words to embeddings has moved,
    which the policy gradient does not see. `cos_mean` / `cos_std` / `cos_pos`: the rollouts'
    cosines, all and the positive's. `scale_only_groups`: groups whose rollouts rank the
    candidates in the same order but whose rewards differ -- advantage that is pure score scale
    (at fixed ranks R_Rank is linear in the cosines)."""
    B, G, K = ro.shape
    R = R.float().cpu()
    lens = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32).view(B, G, K)
    exact = torch.tensor([[float(policy.enc.decode(ro.summaries[(b * G + g) * K]) == q.item.summary)
                           for g in range(G)] for b, (q, _) in enumerate(batch)])           # (B, G)
    tok_adv = A.abs().cpu()[:, None] * ro.sampled.cpu().float()                             # (S, T)
    per_item = tok_adv.sum(1).view(B, G, K)
    # the scale channel: R_Rank is linear in the cosines at fixed ranks, so rewards can differ,
    # order unchanged
    s = ro.scores.float().cpu()                                                          # (B, G, C)
    order = s.argsort(-1, descending=True)                                               # (B, G, C)
    same_order = (order == order[:, :1]).all(-1).all(-1)                                      # (B,)
    spread = R.max(1).values - R.min(1).values                                                # (B,)
    e = ro.e.detach()
    return {"reward_mean": R.mean().item(), "reward_std": R.std().item(),
            "R_margin": parts["margin"].float().mean().item(),
            "R_rank": parts["rank"].float().mean().item(),
            "top1": (parts["pos_rank"] == 1).float().mean().item(),
            "tied_groups": (spread < 1e-6).float().mean().item(),
            "kl": info["kl"].item(), "clip_low": info["clip_low"].item(),
            "clip_high": info["clip_high"].item(),
            "summary_len": lens.mean().item(), "query_exact": exact.mean().item(),
            "corr_len": group_corr(R.float(), lens.mean(2)),
            "corr_exact": group_corr(R.float(), exact),
            "adv_query": (per_item[:, :, 0].sum() / per_item.sum().clamp(min=1e-12)).item(),
            "pg": info["pg"].item(), "kl_term": args.beta * info["kl"].item(),
            "drift": (1 - (e.reshape(e_ref.shape) * e_ref).sum(-1)).mean().item(),
            "cos_mean": s.mean().item(), "cos_std": s.std().item(),
            "cos_pos": s[..., 0].mean().item(),
            "scale_only_groups": (same_order & (spread >= 1e-6)).float().mean().item()}


def control_step(args, policy, ref, opt, made, gen, autocast, step: int) -> dict:
    """--control (in place of GRPO): the equal-compute control, stage 2 continued -- stage 2's
    exact loss (InfoNCE with summary dropout + next-token loss, its tau, lm_weight and dropout
    rate, read from the stage-2 checkpoint) -- over the same candidate sets (positive + the mined
    negatives), one optimizer step per batch as GRPO takes."""
    saved = ref.meta.get("args", {})
    tau, lm_weight = saved.get("tau", args.tau), saved.get("lm_weight", args.lm_weight)
    rate = saved.get("summary_dropout_end")   # an annealed stage 2 is continued at its final rate
    rate = saved.get("summary_dropout", args.summary_dropout) if rate is None else rate
    policy.model.train()
    batch = made["batch"]
    items, instr = data.rollout_items(batch)
    rng = random.Random(f"{args.seed}-control-{step}")
    drop = my_share([rng.random() < rate for _ in range(len(items) * world_of(args))], args)
    with phase("data"):
        b, imgs = policy.batch(items, instr, policy.enc.reference_summaries(items, drop))
    e, logp, lm_mask = train.teacher_forced_on(policy.model, b, imgs, torch.tensor(drop), autocast)
    e = e.view(len(batch), -1, e.shape[-1])                            # (B, K, D): query, pos, negs
    l_nce = train.info_nce(e[:, 0], e[:, 1:], tau)
    l_lm = train.lm_loss(logp, lm_mask, args)
    loss = l_nce + lm_weight * l_lm
    optimizer_step(opt, policy.model, loss, args)
    return {"loss": loss.item(), "infonce": l_nce.item(), "lm": l_lm.item()}


STUDY_SHOWN = train.ELVA_SHOWN + ("cos_pos", "infonce", "lm")


def study_instances(args, instances: list) -> tuple[list, list]:
    """The RL instances the study trains on, and those the transfer probe holds out: H held out
    (--probe_transfer), then --rl_instances N of the rest, both drawn once from a seeded shuffle
    (a fixed set: optimisation on few instances, or memorisation?)."""
    if not (args.probe_transfer or args.rl_instances):
        return instances, []                                       # the paper's: every instance
    order = list(instances)
    random.Random(f"{args.seed}-study-instances").shuffle(order)
    heldout, rest = order[:args.probe_transfer], order[args.probe_transfer:]
    return (rest[:args.rl_instances] if args.rl_instances else rest), heldout


def study_elva_stage(args, device, autocast):
    """Stage 3 of `study.py run`: train.py's set-up (open_elva_stage, rl_inputs), then the
    study's step or the control in runtime's loop."""
    t0 = time.time()
    setup = train.open_elva_stage(args, device, autocast)
    if setup is None:
        return
    st = setup.stage
    instances, heldout = study_instances(args, setup.instances)
    if len(instances) < args.rl_batch:
        fail("--rl_instances", args.rl_instances, f">= --rl_batch {args.rl_batch}")
    if args.probe_transfer or args.rl_instances:
        print(f"{st.name}: trains on {len(instances)} instances; {len(heldout)} held out")
    probe = TransferProbe(args, heldout, st, autocast) if heldout else None
    gen = torch.Generator(device=device)

    def step_fn(i, made):
        if args.control:
            return control_step(args, st.retriever, setup.ref, st.opt, made, gen, autocast, i)
        return study_step(args, st.retriever, setup.ref, st.opt, made, gen, autocast, i, probe)

    run_steps(args, st, train.rl_inputs(args, instances, st, device), step_fn, show=STUDY_SHOWN,
              gen=gen)
    print(f"{st.name}: saved {st.folder} ({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------------------------------
# `python study.py run`: train.py's pipeline with the variants


def run_parser() -> argparse.ArgumentParser:
    """train.py's flags, the sizes it takes from its preset, and the study's variants (each off by
    default; what each changes and why: this file's docstring)."""
    p = train.build_parser()
    p.description = __doc__
    add = p.add_argument_group("sizes train.py takes from its preset").add_argument
    for k, t in (("n_train", int), ("n_test", int), ("rl_queries", int), ("rl_pool_scenes", int),
                 ("eval_queries", int), ("mrbench_per_task", int), ("weight_decay", float),
                 ("warmup", float)):
        add(f"--{k}", type=t, default=None, help=f"(default: the preset's {k})")
    add("--elva_name", default=None, help="the stage-3 checkpoint's folder name (default elva)")
    add = p.add_argument_group("stage 2 variants (ours)").add_argument
    add("--summary_dropout_end", type=float, default=None, help="anneal summary dropout to this")
    add("--own_summaries", type=float, default=0.0, help="share of kept summaries: the model's own")
    add("--own_from", type=float, default=0.5, help="share of stage 2 before --own_summaries")
    add = p.add_argument_group("stage 3 variants (ours)").add_argument
    add("--control", action="store_true", help="the equal-compute control (control_step)")
    add("--reward", default="paper", help="paper | toy | length | rank | zscore | ndcg | pool",
        choices=["paper", "toy", "length", "rank", "zscore", "ndcg", "pool"])
    add("--best_of_g", action="store_true", help="best-of-G distillation (study_advantages)")
    add("--credit", default="rollout", choices=["rollout", "sequence"], help="study_advantages")
    add("--advantage", default="group", choices=["group", "mean"], help="study_advantages")
    add("--sample", default="all", choices=["all", "query"], help="sample_queries_only")
    add("--empty_member", action="store_true", help="one empty query summary per group")
    add("--scorer", default="policy", choices=["policy", "frozen"], help="scored_rollout")
    add("--anchor", type=float, default=0.0, help="weight of anchor_loss")
    add("--pathwise", type=float, default=0.0, help="weight of pathwise_loss")
    add("--num_iterations", type=int, default=None, help="updates per rollout batch (default 1)")
    add("--rl_instances", type=int, default=0, help="train on a fixed set of N instances (0: all)")
    add("--probe_transfer", type=int, default=0, help="held-out instances of TransferProbe")
    add("--probe_every", type=int, default=1, help="steps between the probe's measurements")
    return p


def get_run_args(argv):
    args = train.get_args(argv, parser=run_parser())
    for k in ("anchor", "pathwise"):
        if not getattr(args, k) >= 0:
            fail(f"--{k}", getattr(args, k), "a finite number >= 0")
    for k in ("rl_instances", "probe_transfer"):
        if getattr(args, k) < 0:
            fail(f"--{k}", getattr(args, k), "an integer >= 0")
    if args.probe_every < 1:
        fail("--probe_every", args.probe_every, "an integer >= 1")
    check_fractions(args, (("summary_dropout_end", 0, 1), ("own_summaries", 0, 1),
                           ("own_from", 0, 1)))
    if args.mbeir and (args.summary_dropout_end is not None or args.own_summaries > 0):
        fail("--mbeir", args.mbeir, "GrainWorld with the stage-2 variants (they wrap GrainWorld's "
                                    "batch maker)")
    return args


def run(argv):
    """train.main's pipeline, each stage the paper's or, where a flag asks for one, the study's."""
    args = get_run_args(argv)
    eval_tasks = None
    if args.mbeir:
        import mbeir
        eval_tasks = mbeir.eval_tasks(args)
    device, autocast, threads = start_run(args, train.SHAPING_ARGS)
    t0 = time.time()
    variant2 = args.summary_dropout_end is not None or args.own_summaries > 0
    stages = {"text": train.text_stage,
              "contrastive": variant_contrastive_stage if variant2 else train.contrastive_stage}
    if "contrastive" in args.stages:
        source, tok = source_tokenizer(args, train.read_source(args), t0)
        for name in [s for s in ("text", "contrastive") if s in args.stages]:
            stages[name](args, source, tok, device, autocast)
    if "elva" in args.stages:
        study_elva_stage(args, device, autocast)
    finish_run(args, device, threads, t0, eval_tasks)


# --------------------------------------------------------------------------------------------------
# `python study.py audit --ckpt DIR`: the reward audit, no training. Does the reward point at better
# summaries when they are sampled (then the optimiser is what fails), or the wrong way (then the
# reward is)?


def _avg_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks within each row (1 = smallest), ties averaged. x (N, G) -> (N, G)."""
    less = (x[:, None, :] < x[:, :, None]).sum(-1).float()
    equal = (x[:, None, :] == x[:, :, None]).sum(-1).float()
    return less + (equal + 1) / 2


def group_spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of Spearman's rho between x and y (N, G); a row where either side is
    constant counts 0."""
    a, b = _avg_ranks(x), _avg_ranks(y)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 1e-9, (a * b).sum(1) / den.clamp(min=1e-9),
                       torch.zeros_like(den)).mean().item()


@torch.no_grad()
def embed_with(ret, items, instr, summaries, chunk: int = 256, temperature: float | None = None):
    """Items embedded with the given summaries (teacher-forced, then [RET]) -> (N, D); with a
    temperature also the summaries' log-probabilities under the model at it (N,)."""
    out, lps = [], []
    for i in range(0, len(items), chunk):
        b, imgs = ret.batch(items[i:i + chunk], instr[i:i + chunk], summaries[i:i + chunk])
        if temperature is None:
            out.append(ret.model.embed(b, imgs).float())
            continue
        logp, h = ret.model.token_logprobs(b, imgs, temperature)
        out.append(ret.model.ret_embedding(h, b["ret_pos"]))
        lps.append(logp.sum(1))
    return torch.cat(out) if temperature is None else (torch.cat(out), torch.cat(lps))


@torch.no_grad()
def audit_task(ret, task, queries, pool, G: int, temperature: float, gen, n_hard: int, n_rand: int,
               rng, autocast,
               sample_candidates: bool = False):
    """One task's MRBench-mini queries: the true pool rank of the positive with each kind of
    query summary, and the rewards of G sampled summaries in the paper's context (positive +
    n_hard hardest + n_rand random candidates of the pool, each with its greedy summary -- or,
    with sample_candidates, with a summary sampled afresh for each of the G rollouts, as the
    paper's rollouts sample every item's words; the true rank stays the query summary's rank in
    the pool with its greedy summaries, what evaluation measures)."""
    import eval as evaluation
    Q, instr = len(queries), [data.INSTRUCTIONS[task]] * len(queries)
    items = [q.item for q in queries]
    with autocast():
        ep, _ = ret.embed_items(pool, [None] * len(pool))       # (P, D) the pool's greedy summaries
        b, imgs = ret.batch(items, instr, None)
        greedy = ret.model.generate(b["tokens"], b["attn"], imgs)
        index = torch.arange(Q, device=b["tokens"].device).repeat_interleave(G)
        samples = ret.model.generate(b["tokens"], b["attn"], imgs, temperature=temperature,
                                     generator=gen,
                                     index=index)                              # Q * G, query-major
        kinds = {"greedy": greedy, "empty": [[] for _ in items],
                 "reference": [ret.enc.summary(q.item.summary) for q in queries]}
        emb = {k: embed_with(ret, items, instr, v) for k, v in kinds.items()}
        es, lp = embed_with(ret, [it for it in items for _ in range(G)],
                            [i for i in instr for _ in range(G)], samples, temperature=temperature)
    rel = evaluation.relevant_indices(task, queries, pool)                           # (Q, P_max)
    ranks = {k: evaluation.ranks_of_best_positive(e, ep, rel) for k, e in emb.items()}
    # (Q, G)
    true = evaluation.ranks_of_best_positive(es, ep, rel.repeat_interleave(G, 0)).view(Q, G).float()
    # the paper's context per query: the positive, the hardest and some random
    # non-relevant pool candidates
    s_greedy = emb["greedy"] @ ep.T                                            # (Q, P)
    ctx = []
    for qi, q in enumerate(queries):
        relevant = set(x for x in rel[qi].tolist() if x >= 0)
        pos = pool.index(q.positive) if q.positive in pool else min(relevant)
        others = [j for j in s_greedy[qi].argsort(descending=True).tolist() if j not in relevant]
        rest = others[n_hard:]
        ctx.append([pos] + others[:n_hard] + rng.sample(rest, min(n_rand, len(rest))))
    ctx = torch.tensor(ctx)                                                    # (Q, C)
    if not sample_candidates:   # every rollout sees the candidates' greedy summaries
        ec = ep.cpu()[ctx][:, None].expand(-1, G, -1, -1)                       # (Q, G, C, D)
    else:   # every context candidate writes G summaries, one per rollout
        cand = [pool[j] for j in ctx.flatten().tolist()]                       # Q * C, query-major
        ec = []
        for i in range(0, len(cand), 64):                         # 64 candidates x G rows at a time
            part = cand[i:i + 64]
            with autocast():
                cb, cimgs = ret.batch(part, [None] * len(part), None)
                index = torch.arange(len(part), device=cb["tokens"].device).repeat_interleave(G)
                cs = ret.model.generate(cb["tokens"], cb["attn"], cimgs, temperature=temperature,
                                        generator=gen, index=index)            # len(part) * G
                repeated = [c for c in part for _ in range(G)]
                ec.append(embed_with(ret, repeated, [None] * len(cs), cs).cpu())
        ec = torch.cat(ec)                                                     # (Q * C * G, D)
        ec = ec.view(Q, ctx.shape[1], G, -1).transpose(1, 2)                   # (Q, G, C, D)
    scores = torch.einsum("qgd,qgcd->qgc", es.view(Q, G, -1).cpu(), ec)         # (Q, G, C)
    gains = torch.stack([torch.tensor([1.0] + [0.5 if one_grain_apart(pool[j].scene,
                                                                      q.positive.scene) else 0.0
                                               for j in row[1:].tolist()])
                         for q, row in zip(queries, ctx)])
    rewards = {"R_total (paper)": total_reward(scores), "R_Rank (paper)": ranking_reward(scores),
               "rank only": rank_reward(scores), "zscore R_total": zscore_reward(scores),
               "ndcg (graded)": ndcg_reward(scores, gains[:, None, :])}
    lengths = torch.tensor([len(x) for x in samples], dtype=torch.float32).view(Q, G)
    # picks that need no label: the sample the model finds likeliest, the medoid of the G sampled
    # embeddings (highest mean cosine to the others), and their normalised mean
    E = es.view(Q, G, -1)                                                      # (Q, G, D) unit
    near = ((E @ E.transpose(1, 2)).sum(-1) - 1) / (G - 1)                     # (Q, G)
    mean = torch.nn.functional.normalize(E.mean(1), dim=-1)                    # (Q, D)
    qi = torch.arange(Q)
    free = {"likeliest": true[qi, lp.view(Q, G).argmax(1).cpu()],
            "medoid": true[qi, near.argmax(1).cpu()],
            "centroid": evaluation.ranks_of_best_positive(mean, ep, rel).float()}
    return ranks, true, rewards, lengths, scores.mean(-1), free


def subcommand(name: str, description: str, queries: int | None = None) -> Parser:
    """The parser of `study.py NAME`, with --threads and --out (and --queries where it
    evaluates: the queries per task)."""
    p = Parser(prog=f"study.py {name}", description=description)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    if queries is not None:
        p.add_argument("--queries", type=int, default=queries, help="queries per task")
    return p


def audit(argv):
    p = subcommand("audit", "the reward audit (no training): R@5 on MRBench-mini with greedy / "
                   "empty / reference query summaries, the mean of G sampled ones, the best of G "
                   "chosen by each reward, the oracle best of G, and label-free picks", 100)
    p.add_argument("--ckpt", required=True, help="a checkpoint folder (e.g. runs/cpu/contrastive)")
    p.add_argument("--samples", type=int, default=16, help="G: sampled query summaries per query")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--n_hard", type=int, default=4,
                   help="hardest pool candidates in each reward's context")
    p.add_argument("--n_rand", type=int, default=4,
                   help="random pool candidates in each reward's context")
    p.add_argument("--sample_candidates", action="store_true",
                   help="the context candidates' summaries sampled too, afresh per rollout (the "
                        "paper's rollouts); default: their greedy summaries")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling and the random context")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    a = p.parse_args(argv)
    if a.samples < 2 or a.queries < 1 or not a.temperature > 0:
        fail("--samples / --queries / --temperature", (a.samples, a.queries, a.temperature),
             ">= 2, >= 1, > 0")
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device(a.device)
    ret = elva.Retriever.from_pretrained(a.ckpt, device)
    if not isinstance(ret.meta.get("world"), dict):
        fail("--ckpt", a.ckpt, "a checkpoint trained on GrainWorld (its config.json has a 'world' "
                               "section)")
    world = data.GrainWorld(data.WorldConfig(**ret.meta["world"]))
    gen = torch.Generator(device=device).manual_seed(a.seed)
    rng = random.Random(a.seed)
    t0 = time.time()
    parts = []
    for task, (queries, pool) in world.mrbench_mini(a.queries).items():
        parts.append(audit_task(ret, task, queries, pool, a.samples, a.temperature, gen, a.n_hard,
                                a.n_rand, rng, autocast, a.sample_candidates))
        print(f"audit: {task} done ({time.time() - t0:.0f}s)", flush=True)
    true, lengths, mean_cos = (torch.cat([x[i] for x in parts]) for i in (1, 3, 4))   # (N, G) each
    rows = {f"{k} summary": torch.cat([x[0][k] for x in parts]).float()
            for k in ("greedy", "empty", "reference")}
    rows[f"mean of {a.samples} samples"] = true                      # R@5 averaged over the samples
    idx = torch.arange(true.shape[0])
    corr = {}
    for name in parts[0][2]:
        R = torch.cat([x[2][name] for x in parts])                             # (N, G)
        rows[f"best of {a.samples} by {name}"] = true[idx, R.argmax(1)]
        corr[name] = (group_spearman(R, -true), group_spearman(R, lengths),
                      group_spearman(R, mean_cos))
    rows[f"oracle best of {a.samples} (true pool rank)"] = true.min(1).values
    for name in parts[0][5]:   # without the label: what a policy or an inference rule could reach
        label_free = torch.cat([x[5][name] for x in parts])
        rows[f"{name} of the {a.samples} samples (no label)"] = label_free
    res = {"ckpt": a.ckpt, "queries": int(true.shape[0]), "samples": a.samples,
           "sample_candidates": a.sample_candidates,
           "rows": {k: {"R@5": (v <= 5).float().mean().item(), "mean_rank": v.mean().item()}
                    for k, v in rows.items()},
           "spearman": {k: dict(zip(("true_rank", "length", "mean_cos"), v))
                        for k, v in corr.items()}}
    ctx_words = "sampled afresh per rollout" if a.sample_candidates else "their greedy summaries"
    print(f"\nReward audit of {a.ckpt}: MRBench-mini, {res['queries']} queries ({a.queries} per "
          f"task), the pool's greedy summaries; context = positive + {a.n_hard} hardest + "
          f"{a.n_rand} random, {ctx_words} ({time.time() - t0:.0f}s)")
    print("| the query's summary | R@5 | mean rank of the positive |\n|---|---|---|")
    for k, v in res["rows"].items():
        print(f"| {k} | {v['R@5']:.3f} | {v['mean_rank']:.2f} |")
    print("\n| reward | Spearman with the true pool rank (+: better) | with summary length | with "
          "mean cosine |\n|---|---|---|---|")
    for k, v in res["spearman"].items():
        print(f"| {k} | {v['true_rank']:+.2f} | {v['length']:+.2f} | {v['mean_cos']:+.2f} |")
    if a.out:
        write_json(Path(a.out), res)


# --------------------------------------------------------------------------------------------------
# `python study.py grains --ckpt DIR`: where the greedy summaries err, per grain type, and
# `python study.py eval --ckpt DIR --scorer INIT`: eval.py's table for a --scorer frozen run


def grains_of(summary: str) -> dict:
    """A summary read back into its grains: the shapes (entities); the colour and size words
    (attributes); which colour and size go with which shape (bindings); the relations -- a
    caption's ordered (shapes, relation words), a scene's (shape, cell) of each object; None where
    the summary states no relation (a caption without one, a one-object scene)."""
    words = summary.replace(";", " ").split()
    objs, rels, pending = [], [], []
    for i, w in enumerate(words):
        if w in data.SHAPES:
            objs.append((w, pending, []))
            pending = []
        elif w in ("left", "right") and words[i + 1:i + 2] == ["of"] or w in ("above", "below"):
            rels.append(w)
        elif w in data.ROWS or w in data.COLS:
            if objs:
                objs[-1][2].append(w)                                      # a scene's cell
        elif w not in ("and", "of"):
            pending.append(w)                                              # colours, sizes, ...
    shapes = [sh for sh, _, _ in objs]
    attrs = [w for _, ws, _ in objs for w in ws]
    if rels:
        relation = (shapes, rels)
    elif any(cell for _, _, cell in objs) and len(objs) > 1:
        relation = sorted((sh, tuple(cell)) for sh, _, cell in objs)
    else:
        relation = None
    return {"entity": sorted(shapes),
            "attribute": sorted(w for w in attrs if w in data.COLORS or w in data.SIZES),
            "binding": sorted((w, sh) for sh, ws, _ in objs for w in ws),
            "relation": relation}


def grain_errors(ret, bench, autocast) -> dict:
    """On MRBench-mini: the share of greedy query and candidate summaries that state each grain
    type as the reference summary does (relations counted where the reference states one)."""
    hits = {side: {g: [] for g in ("entity", "attribute", "binding", "relation")}
            for side in ("query", "candidate")}
    for task, (queries, pool) in bench.items():
        sides = (("query", [q.item for q in queries], [data.INSTRUCTIONS[task]] * len(queries)),
                 ("candidate", pool, [None] * len(pool)))
        for side, items, instr in sides:
            _, texts = ret.embed_items(items, instr, autocast=autocast())
            for it, text in zip(items, texts):
                want, got = grains_of(it.summary), grains_of(text)
                for g in hits[side]:
                    if want[g] is not None:
                        hits[side][g].append(want[g] == got[g])
    return {side: {g: sum(v) / max(1, len(v)) for g, v in gs.items()} for side, gs in hits.items()}


def grains(argv):
    p = subcommand("grains", "where greedy summaries err, per grain type, on MRBench-mini "
                   "(query and candidate summaries)", 100)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device("auto")
    res = {}
    for c in a.ckpt:
        ret = elva.Retriever.from_pretrained(c, device)
        bench = data.GrainWorld(data.WorldConfig(**ret.meta["world"])).mrbench_mini(a.queries)
        res[c] = grain_errors(ret, bench, autocast)
    print("| checkpoint | summaries | entity | attribute | binding | relation |")
    print("|---|---|---|---|---|---|")
    for c, r in res.items():
        for side, v in r.items():
            print(f"| {c} | {side} | " + " | ".join(f"{v[g]:.3f}" for g in v) + " |")
    if a.out:
        write_json(Path(a.out), res)


def mean_t(xs: list[float]) -> tuple[float, float]:
    """The mean of per-step values and its t (mean / standard error); t ~ 0: no effect."""
    import statistics
    if len(xs) < 2:
        return (xs[0] if xs else float("nan")), float("nan")
    se = statistics.stdev(xs) / len(xs) ** 0.5
    return statistics.mean(xs), (statistics.mean(xs) / se if se > 0 else float("nan"))


def transfer(argv):
    p = Parser(prog="study.py transfer", description="the transfer probe's table: per stage-3 "
               "run, does an update pay on its own instances (delta_same) and on held-out ones "
               "(delta_other)?")
    p.add_argument("runs", nargs="+", help="stage-3 folders whose log.jsonl holds the probe")
    a = p.parse_args(argv)
    print("| run | probed steps | delta_same (t) | delta_other (t) | reward first -> last fifth |"
          " held-out reward first -> last |\n|---|---|---|---|---|---|")
    for run in a.runs:
        recs = log_records(run)
        probed = [r for r in recs if "delta_same" in r]
        if not probed:
            print(f"| {Path(run).name} | 0 | - | - | - | - |")
            continue
        (ds, ts), (do, to) = (mean_t([r[k] for r in probed]) for k in ("delta_same", "delta_other"))
        n = max(1, len(recs) // 5)
        r0, r1 = (sum(r["reward_mean"] for r in part) / len(part) for part in (recs[:n], recs[-n:]))
        print(f"| {Path(run).name} | {len(probed)} | {ds:+.4f} ({ts:+.1f}) | {do:+.4f} ({to:+.1f}) "
              f"| {r0:.3f} -> {r1:.3f} | {probed[0]['other']:.3f} -> {probed[-1]['other']:.3f} |")


class WordsFromScorer:
    """A retriever whose summaries one model writes and another embeds at [RET] (--scorer frozen:
    the policy writes, the frozen stage-2 model embeds); what eval.evaluate reads of a Retriever."""

    def __init__(self, writer, scorer):
        self.writer, self.scorer = writer, scorer
        self.model, self.enc, self.tok = scorer.model, scorer.enc, scorer.tok
        self.meta = writer.meta
        self.device = scorer.device

    def summarise(self, items, instructions, **kw):
        return self.writer.summarise(items, instructions, **kw)

    def batch(self, items, instructions, summaries):
        return self.scorer.batch(items, instructions, summaries)

    @torch.no_grad()
    def embed_items(self, items, instructions, batch_size: int = 256, autocast=None, **_):
        embs, texts = [], []
        for i in range(0, len(items), batch_size):
            its, ins = items[i:i + batch_size], instructions[i:i + batch_size]
            with autocast or torch.autocast("cpu", enabled=False):
                summ = self.writer.summarise(its, ins)
                b, imgs = self.scorer.batch(its, ins, summ)
                embs.append(self.scorer.model.embed(b, imgs).float())
            texts += [self.enc.decode(x) for x in summ]
        return torch.cat(embs), texts


def eval_frozen(argv):
    p = subcommand("eval", "eval.py's table for a --scorer frozen run: the checkpoint writes the "
                   "summaries, --scorer embeds (--queries: of the standard split)", 200)
    p.add_argument("--ckpt", required=True, help="the policy (a --scorer frozen run's checkpoint)")
    p.add_argument("--scorer", required=True, help="the frozen stage-2 checkpoint (its --init)")
    p.add_argument("--mrbench_per_task", type=int, default=100,
                   help="MRBench-mini queries per task")
    a = p.parse_args(argv)
    import eval as evaluation
    torch.set_num_threads(a.threads or default_threads())
    device, autocast = resolve_device("auto")
    ret = WordsFromScorer(elva.Retriever.from_pretrained(a.ckpt, device),
                          elva.Retriever.from_pretrained(a.scorer, device))
    r = evaluation.evaluate(a.ckpt, a.queries, a.mrbench_per_task, device, autocast, ret=ret)
    print(evaluation.table([r]))
    if a.out:
        write_json(Path(a.out), [r])


# --------------------------------------------------------------------------------------------------
# `python study.py runs`: the study's stage-3 runs, each a single-thread process, --jobs at a time
# (on 2 CPU cores two single-thread runs finish sooner than two 2-thread runs in a row). A run whose
# checkpoint exists is skipped; each finished run (but the toy-reward ones) is evaluated into
# OUT/<run>.json. Then the tables:
#     python eval.py --from_json runs/cpu/eval.json runs/study/*.json
#     python eval.py --ladder runs/study                      # the learnability ladder's table
# One run a line: name, seed, its flags; a comment line says what the runs below it are for; a
# trailing backslash continues a line.

RUNS = """
# ELVA as the paper describes it, and equal compute: stage 2 continued on the same sets
elva 0
control 0 --control
# the learnability ladder (seed 0): three rewards through the same GRPO code at growing budgets
# (the paper's reward at lr 1e-5, beta 0.2 is elva-s0)
toy_lr1e-3_b0 0 --reward toy --rl_lr 1e-3 --beta 0
length_lr1e-3_b0 0 --reward length --rl_lr 1e-3 --beta 0
paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0
toy 0 --reward toy
length 0 --reward length
toy_lr1e-4_b0 0 --reward toy --rl_lr 1e-4 --beta 0
length_lr1e-4_b0 0 --reward length --rl_lr 1e-4 --beta 0
paper_lr1e-4_b0 0 --rl_lr 1e-4 --beta 0
toy_lr1e-4 0 --reward toy --rl_lr 1e-4
elva 1
elva 2
control 1 --control
control 2 --control
# the embedding anchor
anchor_length_lr1e-3_b0 0 --reward length --rl_lr 1e-3 --beta 0 --anchor 10
anchor_length_lr1e-3_b0 1 --reward length --rl_lr 1e-3 --beta 0 --anchor 10
anchor_length_lr1e-3_b0 2 --reward length --rl_lr 1e-3 --beta 0 --anchor 10
anchor_paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0 --anchor 10
anchor1_paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0 --anchor 1
anchor_paper_lr1e-4_b0 0 --rl_lr 1e-4 --beta 0 --anchor 10
anchor_credit_lr1e-4_b0 0 --credit sequence --rl_lr 1e-4 --beta 0 --anchor 10
# only the queries sampled
anchor_query_lr1e-4_b0 0 --sample query --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-4_b0 1 --sample query --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-4_b0 2 --sample query --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-3_b0 0 --sample query --rl_lr 1e-3 --beta 0 --anchor 10
# 16x the groups; the paper's GRPO with each summary's tokens averaged first
big_anchor_query_lr1e-4_b0 0 --sample query --rl_lr 1e-4 --beta 0 --anchor 10 \
    --rl_batch 8 --rl_steps 600
big_control 0 --control --rl_batch 8 --rl_steps 600
big_elva 0 --rl_batch 8 --rl_steps 600
elva_seqnorm 0 --loss_norm sequence
# a scale-free reward
rank_query_anchor_lr1e-4_b0 0 --reward rank --sample query --anchor 10 --rl_lr 1e-4 --beta 0
rank_query_anchor_lr1e-4_b0 1 --reward rank --sample query --anchor 10 --rl_lr 1e-4 --beta 0
rank_query_anchor_lr1e-4_b0 2 --reward rank --sample query --anchor 10 --rl_lr 1e-4 --beta 0
# the audit's setting: query-only, G 16, cooler; then the rank in a whole pool
query_t0.5_g16 0 --sample query --temperature 0.5 --group_size 16
query_t0.5_g16 1 --sample query --temperature 0.5 --group_size 16
query_t0.5_g16 2 --sample query --temperature 0.5 --group_size 16
pool_query_t0.5_g16 0 --reward pool --sample query --temperature 0.5 --group_size 16
pool_query_t0.5_g16 1 --reward pool --sample query --temperature 0.5 --group_size 16
pool_query_t0.5_g16 2 --reward pool --sample query --temperature 0.5 --group_size 16
# best-of-G distillation
bestofg_rank_query_anchor_lr1e-5 0 --best_of_g --reward rank --sample query --anchor 10 --rl_lr 1e-5
bestofg_rank_query_anchor_lr1e-5 1 --best_of_g --reward rank --sample query --anchor 10 --rl_lr 1e-5
bestofg_rank_query_anchor_lr1e-5 2 --best_of_g --reward rank --sample query --anchor 10 --rl_lr 1e-5
# 4x the steps: too few?
long_query_t0.5_g16 0 --sample query --temperature 0.5 --group_size 16 --rl_steps 600
long_pool_query_t0.5_g16 0 --reward pool --sample query --temperature 0.5 --group_size 16 \
    --rl_steps 600
long_control 0 --control --rl_steps 600
# round 4, the chain (docs/results.md, "Why stage 3 does not help here"): a fixed set of N
# instances, the frozen scorer (a stationary reward), all instances, the transfer probe on 8
# held-out ones
fixed8_frozen 0 --rl_instances 8 --scorer frozen --sample query --rl_lr 1e-4 --beta 0 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
fixed64_frozen 0 --rl_instances 64 --scorer frozen --sample query --rl_lr 1e-4 --beta 0 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
all_frozen 0 --scorer frozen --sample query --rl_lr 1e-4 --beta 0.02 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
fixed8 0 --rl_instances 8 --sample query --rl_lr 1e-4 --beta 0 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
fixed64 0 --rl_instances 64 --sample query --rl_lr 1e-4 --beta 0 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
all_moving 0 --sample query --rl_lr 1e-4 --beta 0.02 \
    --rl_batch 4 --rl_steps 200 --probe_transfer 8 --probe_every 4
large32_mean_frozen 0 --scorer frozen --sample query --advantage mean \
    --rl_batch 32 --rl_lr 1e-4 --beta 0.02 --rl_steps 25 --probe_transfer 8 --probe_every 2
elva_probe 0 --probe_transfer 8 --probe_every 2
# round 4, the levers: each on the paper's configuration, beside its equal-compute control (the
# 32-instance runs take 25 steps, 800 instances, each RL instance once: 100 steps took ~90 minutes
# at one thread)
lever_large32_mean 0 --rl_batch 32 --advantage mean --rl_steps 25
control_large32 0 --control --rl_batch 32 --rl_steps 25
lever_nearmiss 0 --hard_threshold 1
control_nearmiss 0 --control --hard_threshold 1
lever_vision 0 --train_vision
control_vision 0 --control --train_vision
lever_empty 0 --empty_member
"""


def study_runs(argv):
    p = Parser(prog="study.py runs", description="the study's stage-3 runs from one stage-2 model")
    p.add_argument("init", help="the stage-2 checkpoint every run starts from (e.g. "
                                "runs/cpu/contrastive)")
    p.add_argument("out", help="the study's folder (each run's checkpoint lands in "
                               "OUT/<name>-s<seed>)")
    p.add_argument("--only", default=".",
                   help="only the runs whose name-s<seed> matches this regex")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--preset", default="cpu", help="the preset of every run")
    p.add_argument("--device", default="cpu", help="the device of every run")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for line in RUNS.strip().splitlines():
        if not line.split("#")[0].strip():
            continue   # a comment line: what the runs below are for
        name, seed, *flags = line.split("#")[0].split()
        if re.search(a.only, f"{name}-s{seed}"):
            todo.append((name, seed, flags))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread each: --jobs of them share the cores

    def one(name, seed, flags):
        tag = f"{name}-s{seed}"
        if not (out / tag / "config.json").exists():
            cmd = [sys.executable, __file__, "run", "--preset", a.preset, "--device", a.device,
                   "--init", a.init, "--out", str(out), "--stages", "elva", "--no_eval",
                   "--threads", "1", "--seed", seed, "--elva_name", tag, *flags]
            with open(out / f"{tag}.log", "w") as log:
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    return f"FAILED {tag}"
        if not name.startswith("toy") and not (out / f"{tag}.json").exists():
            cmd = [str(Path(__file__).with_name("eval.py")), "--device", a.device]
            if "frozen" in flags:   # the policy writes, the frozen stage-2 model embeds
                cmd = [__file__, "eval", "--scorer", a.init]
            cmd += ["--threads", "1", "--ckpt", str(out / tag), "--out", str(out / f"{tag}.json")]
            with open(out / f"{tag}.eval.log", "w") as log:
                subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
        return f"{time.strftime('%H:%M:%S')} done {tag}"

    with ThreadPoolExecutor(a.jobs) as pool:
        for msg in pool.map(lambda r: one(*r), todo):
            print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# `python study.py compare A B`: two run folders, number for number (what a refactor must not
# change)


# wall-clock fields and paths: not compared
TIMING = {"ms_per_step", "eval_seconds", "seconds", "ckpt"}


def _untimed(x):
    """A JSON value with its timing fields removed, at every depth."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _numbers(path: Path):
    """A file's content without wall-clock fields: tensors for safetensors, records for JSON /
    JSONL."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return [_untimed(json.loads(line)) for line in lines if line.strip()]
    # paths and arguments
    if path.suffix == ".json" and path.name not in ("config.json", "run.json"):
        return _untimed(json.loads(path.read_text()))
    return None


def _verdict(x, y, shared_keys: bool) -> str:
    """same | same on shared keys (...) | DIFFERENT."""
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
        tensors = isinstance(y, dict) and x.keys() == y.keys()
        return "same" if tensors and all(torch.equal(x[k], y[k]) for k in x) else "DIFFERENT"
    if x == y:
        return "same"
    if shared_keys and isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and all(
            isinstance(a, dict) and isinstance(b, dict) for a, b in zip(x, y)):
        if all(all(a[k] == b[k] for k in a.keys() & b.keys()) for a, b in zip(x, y)):
            only = sorted(set().union(*(a.keys() ^ b.keys() for a, b in zip(x, y))))
            return f"same on shared keys ({len(only)} keys on one side only: {', '.join(only)})"
    return "DIFFERENT"


def compare(argv):
    p = Parser(prog="study.py compare", description="are two run folders the same, number for "
               "number? (weights bit for bit; logs and evaluations without their timing fields; "
               "a file on one side only is a difference)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--shared_keys", action="store_true",
                   help="a log record may hold keys the other lacks: "
                   "compare the keys both have (a step that logs fewer values)")
    a = p.parse_args(argv)
    A, B = Path(a.a), Path(a.b)
    files = sorted({f.relative_to(root) for root in (A, B) for f in root.rglob("*")
                    if f.is_file() and _numbers(f) is not None})
    bad = 0
    for rel in files:
        if not (A / rel).is_file() or not (B / rel).is_file():
            verdict = f"ONLY IN {'B' if (B / rel).is_file() else 'A'}"
        else:
            verdict = _verdict(_numbers(A / rel), _numbers(B / rel), a.shared_keys)
        bad += not verdict.startswith("same")
        print(f"{verdict}  {rel}")
    print(f"{len(files) - bad} of {len(files)} files the same")
    sys.exit(1 if bad or not files else 0)


COMMANDS = {"run": run, "runs": study_runs, "audit": audit, "grains": grains, "eval": eval_frozen,
            "transfer": transfer, "compare": compare}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    one_line_errors(COMMANDS[sys.argv[1]], sys.argv[2:])
