"""
What the tests share besides their fixtures (tests/conftest.py): a tiny model, smoke-preset
arguments, a one-process stage, rollout batches, torchrun workers, checks of two runs.
"""

import argparse
import json
import math
import random
from contextlib import nullcontext

import pytest
import torch

import data
import elva
import reward
import retriever
import runtime
import train


def tiny_model(tok, seed=0):
    cfg = elva.ModelConfig(vit_dim=32, vit_layers=1, vit_heads=2, d_model=32, n_layers=2, n_heads=2,
                           vocab_size=tok.get_vocab_size(), max_summary_len=8)
    torch.manual_seed(seed)
    return retriever.Retriever(elva.build_model(cfg, tok).eval(), tok)

def some_items(world, n=4):
    qs = world.sample_queries(random.Random(0), n)
    return qs, [q.item for q in qs], [data.INSTRUCTIONS[q.task] for q in qs]

def rank_reward_by_hand(s_pos, r, negs_by_rank, gamma):
    """negs_by_rank: [(score, rank)] written out by hand."""
    return s_pos / (1 + math.log(r)) - gamma * sum(s * (math.log(k) - 1) for s, k in negs_by_rank)

def rank_rewards_at_equal_scores(C: int, gamma: float, s: float) -> torch.Tensor:
    """R_Rank with the positive at each rank 1..C, every score s: the positive just above every
    negative (rank 1) or just below the first r - 1 of them -- the ranks given as the rule gives
    them."""
    out = []
    for r in range(1, C + 1):
        neg = [k for k in range(1, C + 1) if k != r]
        ranks = torch.tensor([[r] + neg])
        scores = torch.full((1, C), s, dtype=torch.float64)   # float32 rounds near the limit
        out.append(reward.ranking_reward(scores, gamma, ranks=ranks)[0])
    return torch.stack(out)

# Where Triton really runs: compiled on a CUDA machine, else through its interpreter on the CPU
# (kernels.py sets TRITON_INTERPRET=1 before importing triton when there is no CUDA device).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]

DEVICE = DEVICES[0]

def dense_best_positive_ranks(q, corpus, positives):
    """The definition, densely in float64: 1 + #{n not a positive: cos(q, c_n) >= best positive's
    cosine}."""
    qn = torch.nn.functional.normalize(q.cpu().double(), dim=-1)
    cn = torch.nn.functional.normalize(corpus.cpu().double(), dim=-1)
    S = qn @ cn.T                                                           # (M, N)
    pos = positives.cpu().reshape(q.shape[0], -1)
    is_pos = torch.zeros_like(S, dtype=torch.bool)
    for m in range(q.shape[0]):
        is_pos[m, pos[m][pos[m] >= 0]] = True
    best = S.masked_fill(~is_pos, float("-inf")).max(1).values
    return ((S >= best[:, None] - 1e-12) & ~is_pos).sum(1) + 1

def same_weights(a, b) -> bool:
    """Two checkpoints' weights, bit for bit."""
    wa, wb = retriever.read_checkpoint(a)[0], retriever.read_checkpoint(b)[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

def rl_args(*flags, **kw):
    """train.py's arguments on the smoke preset, then `kw` set on them."""
    args = train.get_args(["--preset", "smoke", *flags])
    for k, v in kw.items():
        setattr(args, k, v)
    return args

def local_run(args) -> runtime.Run:
    """A Run of one CPU process with no run folder: what train.py's steps read of a Run."""
    run = runtime.Run.__new__(runtime.Run)
    run.args, run.t0, run.world, run.rank, run.minutes = args, 0.0, 1, 0, {}
    run.threads, run.device, run.autocast = 1, torch.device("cpu"), nullcontext
    run.own, run.defaults = {}, {}
    args.rank, args.world_size = 0, 1
    return run


def stage_of(ret, args, tmp_path, name="elva", lr=1e-3, steps=100):
    """A one-process Run (no run folder) and a stage of it in tmp_path: what a step reads."""
    args.out = str(tmp_path)
    run = local_run(args)
    opt = train.adamw(ret.model.parameters(), lr, 0.0, run.device)
    return run, run.stage(name, steps, ret, opt, {"world": {}})

def made_of(ret, instances) -> data.Instances:
    """A rollout batch as the stage-3 stream makes it: the instances and their encoded prompts."""
    return retriever.encode_rollout(ret.enc, ret.prompt_limit, instances)

def teacher_forced(ret, items, instr, drop):
    """Items embedded with their reference summaries teacher-forced (none where drop[i]), as
    stages 1-2 embed them."""
    b, imgs = ret.batch(items, instr, ret.enc.reference_summaries(items, drop))
    return train.teacher_forced(ret.model, b, imgs, torch.tensor(drop), nullcontext)

def rl_instances(world, n=2, n_neg=3):
    rng = random.Random(0)
    out = []
    for q in world.sample_queries(rng, n):
        pool = [data.candidate_item(q.task, rng, s) for s in rng.sample(world.splits["train"], 20)]
        negs = [c for c in pool if not data.relevant(q.task, q.item, c)][:n_neg]
        out.append((q, negs))
    return out

def two_process_worker(rank, ports, argv_sets, out, main=train.main):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # one rendezvous per run, as torchrun gives each launch its own
    for port, argv in zip(ports, argv_sets):
        os.environ["MASTER_PORT"] = str(port)
        main(argv)
    os.environ["MASTER_PORT"] = str(ports[-1])
    import torch.distributed as dist
    dist.init_process_group("gloo")
    # GRPO's loss on this process's half of the same rollouts, normalised by the global token count
    logp, old, ref, A, mask = grpo_tensors()
    mine = slice(rank * 4, rank * 4 + 4)
    x = logp[mine].clone().requires_grad_()
    run = local_run(argparse.Namespace())
    run.world, run.rank = 2, rank
    n_tokens = run.tokens(mask[mine])
    loss, _ = reward.grpo_loss(x, old[mine], ref[mine], A[mine], mask[mine], 0.2, 0.2,
                               n_tokens=n_tokens)
    loss.backward()
    torch.save((loss.detach(), x.grad), f"{out}/grpo{rank}.pt")
    dist.destroy_process_group()

def grpo_tensors():
    """8 rollout sequences of 5 tokens (policy, old and reference log-probs, advantages, sampled
    mask)."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 5, generator=g) * 3
    old, ref = logp + 0.1 * torch.randn(8, 5, generator=g), logp + 0.3 * torch.randn(8, 5,
                                                                                     generator=g)
    mask = torch.rand(8, 5, generator=g) > 0.3
    # the two halves hold different token counts
    mask[:4, :] = True
    return logp, old, ref, torch.randn(8, generator=g), mask

def two_process_runs(out):
    common = ["--preset", "smoke", "--text_steps", "2", "--steps", "3", "--no_eval", "--threads",
              "1", "--device", "cpu"]
    return [common + ["--stages", "text,contrastive", "--out", str(out / "a")],
            common + ["--stages", "contrastive", "--out", str(out / "b")]]

def free_ports(n: int) -> list[int]:
    import socket
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports

def same_logs_and_weights(one, two, stage, keys=("loss", "infonce", "lm", "masked_false_neg")):
    """A one-process and a two-process run of a stage: the same loss each step, up to float
    summation order (tolerance 1e-4), counts summed over the processes, and the same weights."""
    a_log, b_log = ([json.loads(line)
                     for line in (run / stage / "log.jsonl").read_text().splitlines()]
                    for run in (one, two))
    assert len(a_log) == len(b_log) > 0
    for a, b in zip(a_log, b_log):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), (stage, a["step"], k)
    w1 = retriever.load_checkpoint(one / stage)[0].state_dict()
    w2 = retriever.load_checkpoint(two / stage)[0].state_dict()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1), stage

def untimed(results: dict) -> dict:
    return {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in results.items()}

SMOKE = ["--preset", "smoke", "--stages", "contrastive", "--steps", "6", "--ckpt_every", "3",
         "--no_eval"]

def printed_by(argv) -> str:
    """What train.main prints."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train.main(argv)
    return buf.getvalue()
