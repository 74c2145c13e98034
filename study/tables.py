"""
The study's tables: the learnability ladder of a study folder, the mean +- sd over seeds of runs
named <run>-s<seed>, and `compare` (two run folders, number for number: what a refactor must not
change).

    python -m study ladder runs/study
    python -m study seeds runs/seeds/*/eval.json runs/r4_*/*.json
    python -m study compare RUN_A RUN_B [--shared_keys]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import torch

from retriever import read_checkpoint
from runtime import Parser, log_records


def _log_stats(ckpt: str) -> dict:
    """From a stage's log.jsonl (if there): its training minutes (mining excluded) and the
    reward's mean over the first and the last fifth of its steps (GRPO runs only)."""
    path = Path(ckpt) / "log.jsonl"
    if not path.exists():
        return {}
    recs = log_records(ckpt)
    if not recs:
        return {}
    out = {"minutes": recs[-1]["ms_per_step"] * len(recs) / 60000}
    if "reward_mean" in recs[0]:
        n = max(1, len(recs) // 5)
        out["reward"] = tuple(sum(r["reward_mean"] for r in part) / n
                              for part in (recs[:n], recs[-n:]))
    return out


def ladder(argv):
    p = Parser(prog="python -m study ladder", description="the learnability ladder's table")
    p.add_argument("folder", help="a study folder (python -m study runs writes one)")
    print(ladder_table(p.parse_args(argv).folder))


def seeds(argv):
    p = Parser(prog="python -m study seeds", description="mean +- sd over seeds per run")
    p.add_argument("results", nargs="+", help="eval.py --out JSON files")
    results = []
    for f in p.parse_args(argv).results:
        r = json.loads(Path(f).read_text())
        results += r if isinstance(r, list) else [r]
    print(aggregate(results))


def ladder_table(folder: str) -> str:
    """The learnability ladder: for every stage-3 run in `folder` (one sub-folder per run, as
    `python -m study runs` writes), its reward and budget, and how its reward, KL and summaries moved
    from the first to the last fifth of its steps. t = (last - first) / the standard error of
    that difference over the per-step means: "rises clearly" is t > 3."""
    rows = ["| run | reward | lr | beta | reward "
            "first -> last fifth | t | KL last fifth "
            "| summary length | query summaries "
            "exact | MRBench-mini avg R@5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(p.parent for p in Path(folder).glob("*/model.safetensors")):
        meta = read_checkpoint(run)[3]
        a = meta.get("args", {})
        # (older runs: --rl_objective)
        control = a.get("control") or a.get("rl_objective", "grpo") != "grpo"
        if meta.get("stage") != "elva" or control or not (run / "log.jsonl").exists():
            continue
        recs = log_records(run)
        n = max(2, len(recs) // 5)
        first, last = recs[:n], recs[-n:]

        def mean(rs, k):
            return statistics.mean(r[k] for r in rs) if all(k in r for r in rs) else float("nan")
        r0, r1 = [r["reward_mean"] for r in first], [r["reward_mean"] for r in last]
        se = (statistics.variance(r0) / len(r0) + statistics.variance(r1) / len(r1)) ** 0.5
        t = (statistics.mean(r1) - statistics.mean(r0)) / se if se > 0 else float("nan")
        res = run.parent / f"{run.name}.json"
        mrb = "-"
        if res.exists():
            r = json.loads(res.read_text())
            mrb = f"{(r[0] if isinstance(r, list) else r)['mrbench']['avg']:.3f}"
        rows.append(f"| {run.name} | {a.get('reward', 'paper')} | {a.get('rl_lr'):g} | "
                    f"{a.get('beta'):g} | {statistics.mean(r0):.3f} -> {statistics.mean(r1):.3f} "
                    f"| {t:+.1f} | {mean(last, 'kl'):.4f} | {mean(first, 'summary_len'):.1f} -> "
                    f"{mean(last, 'summary_len'):.1f} | {mean(first, 'query_exact'):.3f} -> "
                    f"{mean(last, 'query_exact'):.3f} | {mrb} |")
    return "\n".join(rows)


def aggregate(results: list[dict]) -> str:
    """Mean +- std over seeds: checkpoints named <run>-s<seed> are grouped by <run> (a markdown
    table). Where the checkpoint's log.jsonl is at hand, also the reward's first-fifth ->
    last-fifth means and the training minutes."""
    groups = {}
    for r in results:
        name = re.sub(r"-s\d+$", "", Path(r["ckpt"]).name)
        groups.setdefault(name, []).append(r)
    cols = [("MRBench-mini avg R@5", lambda r: r["mrbench"]["avg"]),
            ("standard avg R@5", lambda r: r["standard"]["avg"]["R@5"]),
            ("standard avg R@1", lambda r: r["standard"]["avg"]["R@1"]),
            ("near-miss R@1", lambda r: r["near_miss"]["avg"]["R@1"]),
            ("win vs binding", lambda r: r["near_miss"]["avg"]["win_binding"]),
            ("win vs relation", lambda r: r["near_miss"]["avg"]["win_relation"]),
            ("grain-masking dist.", lambda r: r["probe"]["all"]),
            ("MRBench-mini, reference summaries", lambda r: r["headroom"]["reference"])]
    lines = ["| run | seeds | " + " | ".join(c for c, _ in cols) + " | reward first -> last fifth "
                                                                   "| train min |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for name, rs in groups.items():
        cells = []
        for _, get in cols:
            try:
                v = [get(r) for r in rs]
            except KeyError:  # a result written before this column existed
                cells.append("-")
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} +- {sd:.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        logs = [_log_stats(r["ckpt"]) for r in rs]
        rw = [lg["reward"] for lg in logs if "reward" in lg]
        cells.append(f"{statistics.mean(a for a, _ in rw):.3f} -> "
                     f"{statistics.mean(b for _, b in rw):.3f}" if rw
                     else "-")
        mins = [f"{lg['minutes']:.1f}" for lg in logs if "minutes" in lg]
        cells.append(" / ".join(mins) if mins else "-")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# compare: two run folders, number for number


# wall-clock fields and paths: not compared
TIMING = {"ms_per_step", "eval_seconds", "seconds", "ckpt"}


def _untimed(x):
    """A JSON value with its timing fields removed, at every depth."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


# checkpoint files (compared as one checkpoint per folder: weights and step, in either layout),
# and the files that name paths or the machine rather than numbers
CHECKPOINT = re.compile(r"^(model(-\d+|-final)?\.safetensors|optimizer-.*|config\.json)$")
SKIPPED = {"run.json", ".lock"}


def _numbers(path: Path):
    """What compare compares of a file: a checkpoint's weights and step, JSON / JSONL records
    without wall-clock fields, any other file's bytes."""
    if path.is_dir():
        state, _, tok, meta = read_checkpoint(path)
        return {"weights": state, "step": meta.get("step"), "tokenizer": tok.to_str()}
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return [_untimed(json.loads(line)) for line in lines if line.strip()]
    if path.suffix == ".json":
        return _untimed(json.loads(path.read_text()))
    return path.read_bytes()


def _files(root: Path) -> set:
    """The checkpoint folders and the other files under root, relative to it."""
    out = set()
    for f in root.rglob("*"):
        if f.is_file() and f.name not in SKIPPED and not f.name.endswith(".tmp"):
            held = CHECKPOINT.match(f.name) or f.name == "tokenizer.json" and any(
                (f.parent / n).is_file() for n in ("model.safetensors", "config.json"))
            out.add(f.parent.relative_to(root) if held else f.relative_to(root))
    return out


def _verdict(x, y, shared_keys: bool) -> str:
    """same | same on shared keys (...) | DIFFERENT."""
    if isinstance(x, dict) and "weights" in x:
        w, v = x["weights"], y["weights"]
        same = w.keys() == v.keys() and all(torch.equal(w[k], v[k]) for k in w)
        same = same and x["step"] == y["step"] and x["tokenizer"] == y["tokenizer"]
        return "same" if same else "DIFFERENT"
    if x == y:
        return "same"
    if shared_keys and isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and all(
            isinstance(a, dict) and isinstance(b, dict) for a, b in zip(x, y)):
        if all(all(a[k] == b[k] for k in a.keys() & b.keys()) for a, b in zip(x, y)):
            only = sorted(set().union(*(a.keys() ^ b.keys() for a, b in zip(x, y))))
            return f"same on shared keys ({len(only)} keys on one side only: {', '.join(only)})"
    return "DIFFERENT"


def compare(argv):
    p = Parser(prog="python -m study compare", description="are two run folders the same, "
               "number for number? (each checkpoint's weights bit for bit, in either layout; logs "
               "and evaluations without their timing fields; other files byte for byte; a file on "
               "one side only is a difference)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--shared_keys", action="store_true",
                   help="a log record may hold keys the other lacks: "
                   "compare the keys both have (a step that logs fewer values)")
    a = p.parse_args(argv)
    A, B = Path(a.a), Path(a.b)
    files = sorted(_files(A) | _files(B))
    bad = 0
    for rel in files:
        if not (A / rel).exists() or not (B / rel).exists():
            verdict = f"ONLY IN {'B' if (B / rel).exists() else 'A'}"
        else:
            verdict = _verdict(_numbers(A / rel), _numbers(B / rel), a.shared_keys)
        bad += not verdict.startswith("same")
        print(f"{verdict}  {rel}")
    print(f"{len(files) - bad} of {len(files)} files the same")
    sys.exit(1 if bad or not files else 0)
