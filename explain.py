"""
One ELVA step (Section 3.4) on one RL instance, printed by train.py's own functions: the query,
its mined candidates, the G sampled summaries, each rollout's ranked list, rewards and advantage.

    python explain.py runs/cpu/contrastive [--task i2t] [--seed 1]   # the policy and the miner
"""

from __future__ import annotations

import argparse

import torch

import train
from data import TASKS, Item
from retriever import Retriever, encode_rollout, instruction_of, mine_instances
from reward import auto_gamma, group_advantages, total_reward
from runtime import Parser, check_device, one_line_errors, resolve_device


def explain(ckpt: str, device, autocast, task: str | None = None, seed: int = 0):
    """Steps 1-3 of train.grpo_step (rollout, reward, advantage) on one RL instance, printed.
    The checkpoint is the policy and the miner; its saved arguments give G and the constants."""
    ret = Retriever.from_pretrained(ckpt, device)
    args = argparse.Namespace(**{**ret.meta["args"], "rl_queries": 1, "seed": seed})
    source = train.read_source(args, ret.meta)
    instances = mine_instances(args, source, ret, autocast)      # one query per task
    chosen = [x for x in instances if task is None or x[0].task == task]
    if not chosen:
        raise SystemExit(f"--task {task!r}: expected one of "
                         f"{sorted({q.task for q, _ in instances})}")
    batch = chosen[:1]
    gen = torch.Generator(device=device).manual_seed(seed)
    made = encode_rollout(ret.enc, ret.prompt_limit, batch)
    with torch.no_grad():
        ro = train.rollout(args, ret.model, made, gen, autocast)
    R, parts = total_reward(ro.scores, args.alpha, args.epsilon, args.delta, args.gamma,
                            return_parts=True, ranks=ro.ranks)                 # (1, G)
    A = group_advantages(R)
    _, G, K = ro.shape
    q, negs = batch[0]
    names = ["positive"] + [f"negative {i + 1}" for i in range(len(negs))]
    C = K - 1
    gamma = auto_gamma(C) if args.gamma is None else args.gamma
    print(f"\nOne ELVA step on {ckpt} (Section 3.4), task {q.task}: G = {G} rollouts at "
          f"temperature {args.temperature}; R_total = {args.alpha} R_Margin + {args.epsilon} "
          f"R_Rank, delta {args.delta}, gamma {gamma:.4f}")
    print(f"query:      {describe(q.item)}   [instruction: {instruction_of(q)}]")
    for name, c in zip(names, [q.positive, *negs]):
        print(f"{name + ':':12s}{describe(c)}")
    for g in range(G):
        rows = [(g * K + k) for k in range(K)]                   # rollout g's sequences
        said = [ret.enc.decode(ro.summaries[r]) for r in rows]
        order = ro.ranks[0, g].tolist()
        ranked = sorted(range(C), key=lambda j: order[j])
        listing = "  ".join(f"[{order[j]}] {names[j]} {ro.scores[0, g, j].item():.3f}"
                            for j in ranked)
        print(f"\nrollout {g}: the query wrote {said[0]!r}")
        print(f"  ranked list: {listing}")
        print(f"  R_Margin {parts['margin'][0, g].item():.4f} | R_Rank "
              f"{parts['rank'][0, g].item():.4f} | R_total {R[0, g].item():.4f} | "
              f"advantage {A[0, g].item():+.3f}")
        wrote = " | ".join(f"{n}: {s!r}" for n, s in zip(names, said[1:]))
        print(f"  the candidates wrote: {wrote}")
    print(f"\ngroup: R_total mean {R.mean().item():.4f}, std {R.std().item():.4f}; every summary "
          "of rollout g shares its advantage A_g = (R_g - mean) / (std + 1e-4)")


def describe(item: Item) -> str:
    """An item in words: its text; for an image, its scene's reference summary."""
    parts = [repr(item.text)] if item.text else []
    if item.scene is not None:
        parts.append(f"(image: {item.scene.summary()})")
    elif item.image_path:
        parts.append(f"(image {item.image_path})")
    return " ".join(parts) or "(empty)"


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint folder (stage 2 or 3)")
    p.add_argument("--task", default=None, choices=list(TASKS), help="the instance's task")
    p.add_argument("--seed", type=int, default=0, help="the sampling's seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    args = p.parse_args(argv)
    check_device(args.device)
    device, autocast = resolve_device(args.device)
    explain(args.ckpt, device, autocast, args.task, args.seed)


if __name__ == "__main__":
    one_line_errors(main)
