"""
The study's variants of stages 2 and 3 and the equal-compute control, built on train.py's pieces
(`python -m study run ...`): ours, not the paper's. What each flag changes and why:
study/__init__.py.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import torch

import data
import train
from retriever import Retriever, encode_batch, encode_pairs, encode_rollout, rollout_items
from reward import group_advantages, grpo_loss, total_reward
from runtime import Parser, Run, fail, number
from study.rewards import ndcg_reward, rank_reward, sequence_credit, zscore_reward

phase = torch.profiler.record_function


# --------------------------------------------------------------------------------------------------
# Stage 2 variants (ours): their own batches and loss, in train.py's stage-2 loop pieces


def dropout_at(args, step: int) -> float:
    """Stage 2's summary-dropout rate at `step`: constant, or (--summary_dropout_end) annealed
    linearly."""
    if args.summary_dropout_end is None:
        return args.summary_dropout
    frac = step / max(1, args.steps - 1)
    return args.summary_dropout + (args.summary_dropout_end - args.summary_dropout) * frac


@dataclasses.dataclass
class OwnPairs(data.Pairs):
    """data.Pairs with --own_summaries' flags: the items whose summary is the model's own."""
    own: list | None = None


def stage2_variant_inputs(args, world, step: int) -> OwnPairs:
    """data.make_stage2_inputs at the step's dropout rate (--summary_dropout_end), with the items
    whose summary is the model's own (--own_summaries, from --own_from of the steps on) flagged
    `own`."""
    at_step = copy.copy(args)
    at_step.summary_dropout = dropout_at(args, step)
    batch = OwnPairs(**vars(data.make_stage2_inputs(at_step, world, step)))
    if args.own_summaries > 0 and step >= args.own_from * args.steps:
        own_rng = random.Random(f"{args.seed}-own-{step}")
        own = [own_rng.random() < args.own_summaries for _ in range(2 * args.batch_size)]
        batch.own = [o and not d for o, d in zip(own, batch.drop)]
    return batch


def stage2_variant_loss(args, run, retriever, pairs: OwnPairs):
    """--own_summaries: stage 2 reading its own words. Stage 2 learns its embedding from
    reference summaries but is evaluated (and, in stage 3, rewarded) on the summaries it
    generates; the items flagged `own` get the model's current greedy summary instead, so that
    InfoNCE also teaches the [RET] state to use -- or discount -- the words the model really
    writes. Those rows stay out of the next-token loss (they are not references)."""
    if not any(pairs.own or ()):
        return train.stage2_loss(args, run, retriever.model, pairs)
    items, instr, own, drop = pairs.items, pairs.instructions, pairs.own, pairs.drop
    idx = [i for i, o in enumerate(own) if o]
    with torch.no_grad(), phase("generate"), run.autocast():
        written = retriever.summarise([items[i] for i in idx], [instr[i] for i in idx])
    summaries = retriever.enc.reference_summaries(items, drop)
    for i, s in zip(idx, written):
        summaries[i] = s
    with phase("data"):
        encoded = encode_batch(retriever.enc, items, instr, summaries, retriever.prompt_limit)
    no_lm = [d or o for d, o in zip(drop, own)]
    return train.stage2_loss(args, run, retriever.model,
                             dataclasses.replace(pairs, encoded=encoded, drop=no_lm))


def variant_contrastive_stage(args, run, source, tok):
    """Stage 2 with --summary_dropout_end / --own_summaries: train.embedding_stage's loop with
    these batches and this loss."""
    init = Path(args.out) / "text" if "text" in args.stages else None
    model = train.new_model(args, tok, run.device, init).train()
    opt = train.adamw(model.parameters(), args.lr, args.weight_decay, run.device)
    stage = run.stage("contrastive", args.steps, Retriever(model, tok), opt, dict(source.meta),
                      init)
    if stage is None:
        return
    ret = stage.retriever
    batches = run.batches(lambda step: stage2_variant_inputs(args, source.data, step),
                          lambda pairs: pairs.part(run.rank, run.world),
                          lambda pairs: encode_pairs(ret.enc, ret.prompt_limit, pairs),
                          stage.start, args.steps)
    for step in range(stage.start, args.steps):
        pairs = next(batches)
        loss, l_nce, l_lm = stage2_variant_loss(args, run, ret, pairs)
        lr = train.lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        gnorm = update(run, stage, model, loss, step)
        stage.log(step, {"loss": loss, "infonce": l_nce, "lm": l_lm, "lr": lr, "grad_norm": gnorm,
                         "masked_false_neg": int(pairs.false_neg.sum())})
        stage.save_if_due(step)


def update(run, stage, model, loss, step: int) -> torch.Tensor:
    """train.py's update, as its loops write it out: backward, gradients averaged over the
    processes, clipped to norm 1, a non-finite step never applied. -> the gradient norm."""
    stage.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.average_gradients(model)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    stage.stop_unless_finite(step, loss, gnorm)
    stage.opt.step()
    return gnorm


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


def study_rollout(args, policy, made: data.Instances, gen, autocast) -> train.Rollout:
    """Step 1: train.rollout, or with --sample query the queries' summaries alone sampled, or with
    --empty_member the last rollout of each group writing no query summary (an off-policy member:
    can GRPO learn to write nothing where words do not help?)."""
    if args.sample != "query" and not args.empty_member:
        return train.rollout(args, policy.model, made, gen, autocast)
    batch = made.batch
    B, G, K = len(batch), args.group_size, 2 + len(batch[0][1])
    pb, images = train.on_device(made, policy.device)
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
    ro = train.embed_rollout(args, policy.model, pb, images, (B, G, K), summ, ended, autocast)
    ro.sampled[fixed] = False                                   # the candidates' words: not trained
    return ro


def scored_rollout(args, policy, ref, made: data.Instances, gen, autocast):
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
        ref = Retriever.from_pretrained(init)
        world = data.grain_world(data.WorldConfig(**ref.meta["world"]))
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


def study_step(args, run, stage, ref, made, gen, step: int, probe=None) -> dict:
    """The study's stage-3 step: train.grpo_step's five steps with the variants (--sample,
    --scorer, --reward, --advantage, --credit, --best_of_g, --anchor, --pathwise, --num_iterations),
    the diagnostics in the log, and with --probe_transfer the transfer probe after the update."""
    policy, autocast, batch = stage.retriever, run.autocast, made.batch
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
    n_tokens = run.tokens(ro.sampled, args.loss_norm)
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
        update(run, stage, policy.model, loss, step)
    rec = {"loss": loss.item(), **diagnostics(args, ro, batch, R, parts, A, info, policy, e_ref)}
    if probe is not None:
        rec.update(probe.after_update(policy, ref, made, step, rec["reward_mean"], autocast))
    return rec


class TransferProbe:
    """--probe_transfer H: after each update, does it pay beyond its own rollouts? delta_same: the
    reward of the step's own instances re-sampled with the step's seed after the update, minus the
    step's reward (the same samples' seed: a paired difference); delta_other: the reward of H fixed
    held-out training instances (never trained on) now minus at the previous probe (over the last
    --probe_every updates), each time sampled with one fixed seed. The run's t of each
    (`python -m study transfer`) says whether an update that pays on its own instances pays
    anywhere else."""

    def __init__(self, args, heldout: list, stage):
        self.args, self.every = args, args.probe_every
        self.made = encode_rollout(stage.retriever.enc, stage.retriever.prompt_limit, heldout)
        self.seed = args.seed * 100003 + 99991                  # one seed for every held-out roll
        self.other = None

    def reward(self, policy, ref, made, seed: int, autocast) -> float:
        gen = torch.Generator(device=policy.device).manual_seed(seed)
        with torch.no_grad():
            ro, _, _ = scored_rollout(self.args, policy, ref, made, gen, autocast)
            R, _ = study_reward(self.args, ro, made.batch, policy)
        return R.float().mean().item()

    def start(self, policy, ref, autocast):
        """The held-out reward before any update: the first delta_other's baseline."""
        self.other = self.reward(policy, ref, self.made, self.seed, autocast)

    def after_update(self, policy, ref, made, step: int, before: float, autocast) -> dict:
        if step % self.every:
            return {}
        same = self.reward(policy, ref, made, train.rollout_seed(self.args, step, 0), autocast)
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


def control_step(args, run, stage, ref, made, step: int) -> dict:
    """--control (in place of GRPO): the equal-compute control, stage 2 continued -- stage 2's
    exact loss (InfoNCE with summary dropout + next-token loss, its tau, lm_weight and dropout
    rate, read from the stage-2 checkpoint) -- over the same candidate sets (positive + the mined
    negatives), one optimizer step per batch as GRPO takes."""
    saved = ref.meta.get("args", {})
    tau, lm_weight = saved.get("tau", args.tau), saved.get("lm_weight", args.lm_weight)
    rate = saved.get("summary_dropout_end")   # an annealed stage 2 is continued at its final rate
    rate = saved.get("summary_dropout", args.summary_dropout) if rate is None else rate
    policy = stage.retriever
    policy.model.train()
    batch = made.batch
    items, instr = rollout_items(batch)
    rng = random.Random(f"{args.seed}-control-{step}")
    drop = run.share([rng.random() < rate for _ in range(len(items) * run.world)])
    with phase("data"):
        b, imgs = policy.batch(items, instr, policy.enc.reference_summaries(items, drop))
    e, logp, lm_mask = train.teacher_forced(policy.model, b, imgs, torch.tensor(drop), run.autocast)
    e = e.view(len(batch), -1, e.shape[-1])                            # (B, K, D): query, pos, negs
    l_nce = train.info_nce(e[:, 0], e[:, 1:], tau)
    l_lm = train.lm_loss(run, logp, lm_mask)
    loss = l_nce + lm_weight * l_lm
    update(run, stage, policy.model, loss, step)
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


def study_elva_stage(args, run):
    """Stage 3 of `python -m study run`: train.py's set-up (open_elva_stage, rl_batches) and loop,
    with the study's step or the control."""
    opened = train.open_elva_stage(args, run)
    if opened is None:
        return
    stage, ref, instances = opened
    instances, heldout = study_instances(args, instances)
    if len(instances) < args.rl_batch:
        fail("--rl_instances", args.rl_instances, f">= --rl_batch {args.rl_batch}")
    if args.probe_transfer or args.rl_instances:
        print(f"{stage.name}: trains on {len(instances)} instances; {len(heldout)} held out")
    stage.show = STUDY_SHOWN
    probe = TransferProbe(args, heldout, stage) if heldout else None
    if probe is not None:
        probe.start(stage.retriever, ref, run.autocast)
    batches = train.rl_batches(args, run, stage, instances)
    gen = torch.Generator(device=run.device)
    for step in range(stage.start, stage.steps):
        gen.manual_seed(train.rollout_seed(args, step, run.rank))
        made = next(batches)
        if args.control:
            rec = control_step(args, run, stage, ref, made, step)
        else:
            rec = study_step(args, run, stage, ref, made, gen, step, probe)
        stage.log(step, rec)
        stage.save_if_due(step)


# --------------------------------------------------------------------------------------------------
# `python -m study run`: train.py's pipeline with the variants


def run_parser() -> Parser:
    """train.py's flags, the sizes it takes from its preset, and the study's variants (each off by
    default; what each changes and why: this file's docstring)."""
    p = train.build_parser()
    p.description = __doc__
    add = p.add_argument_group("sizes train.py takes from its preset").add_argument
    count = number(1, kind=int)
    for k, t in (("n_train", count), ("n_test", count), ("rl_queries", count),
                 ("rl_pool_scenes", count), ("eval_queries", count), ("mrbench_per_task", count),
                 ("weight_decay", number(0)), ("warmup", number(0, 1))):
        add(f"--{k}", type=t, default=None, help=f"(default: the preset's {k})")
    add("--elva_name", default=None, help="the stage-3 checkpoint's folder name (default elva)")
    add = p.add_argument_group("stage 2 variants (ours)").add_argument
    add("--summary_dropout_end", type=number(0, 1), default=None,
        help="anneal summary dropout to this")
    add("--own_summaries", type=number(0, 1), default=0.0,
        help="share of kept summaries: the model's own")
    add("--own_from", type=number(0, 1), default=0.5,
        help="share of stage 2 before --own_summaries")
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
    add("--anchor", type=number(0), default=0.0, help="weight of anchor_loss")
    add("--pathwise", type=number(0), default=0.0, help="weight of pathwise_loss")
    add("--num_iterations", type=count, default=None, help="updates per rollout batch (default 1)")
    add("--rl_instances", type=number(0, kind=int), default=0,
        help="train on a fixed set of N instances (0: all)")
    add("--probe_transfer", type=number(0, kind=int), default=0,
        help="held-out instances of TransferProbe")
    add("--probe_every", type=count, default=1, help="steps between the probe's measurements")
    return p


def get_run_args(argv, parser=None):
    args = train.get_args(argv, parser=parser or run_parser())
    if args.mbeir and (args.summary_dropout_end is not None or args.own_summaries > 0):
        fail("--mbeir", args.mbeir, "GrainWorld with the stage-2 variants (they wrap GrainWorld's "
                                    "batch maker)")
    return args


def run(argv):
    """train.main's pipeline, each stage the paper's or, where a flag asks for one, the study's."""
    parser = run_parser()
    args = get_run_args(argv, parser)
    eval_tasks = None
    if args.mbeir:
        import mbeir
        eval_tasks = mbeir.eval_tasks(args)
    source = train.read_source(args) if "contrastive" in args.stages else None
    run = Run(args, train.SHAPING_ARGS, parser)
    variant2 = args.summary_dropout_end is not None or args.own_summaries > 0
    if "contrastive" in args.stages:
        tok = run.tokenizer(source)
        if "text" in args.stages:
            train.text_stage(args, run, source, tok)
        stage2 = variant_contrastive_stage if variant2 else train.contrastive_stage
        stage2(args, run, source, tok)
    if "elva" in args.stages:
        study_elva_stage(args, run)
    if not args.no_eval and run.rank == 0:
        train.evaluate(args, run, eval_tasks)
    run.finish()
