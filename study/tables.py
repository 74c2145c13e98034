"""
The study's tables: the learnability ladder of a study folder, the mean +- sd over seeds of runs
named <run>-s<seed>, and `compare` (two run folders, number for number: what a refactor must not
change).

    python -m study ladder runs/study
    python -m study seeds runs/seeds/*/eval.json runs/r4_*/*.json
    python -m study precondition runs/seeds/*/eval.json   # the models against the targets
    python -m study compare RUN_A RUN_B [--shared_keys]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import torch

from eval import check_pooled
from retriever import read_checkpoint
from retriever import log_records
from runtime import Parser


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
    print(aggregate(read_results(p.parse_args(argv).results)))


def read_results(files: list[str]) -> list[dict]:
    """eval.py --out files (each one result or a list of them) -> one list of results."""
    results = []
    for f in files:
        r = json.loads(Path(f).read_text())
        results += r if isinstance(r, list) else [r]
    return results


# (row, target or None, the value in an eval.py result); MRBench-mini's sd is checked per world
PRECONDITION = [(f"{part} {kind}", target, lambda r, p=part, k=kind: r["precondition"][p][k])
                for part, kinds, target in (("sees", ("binding", "relation", "position"), 0.95),
                                            ("sees", ("shape", "color", "size"), None),
                                            ("says", ("binding", "relation"), 0.8),
                                            ("says", ("entity", "cell", "exact"), None),
                                            ("reads", ("binding", "relation"), 0.9),
                                            ("reads_text", ("binding", "relation"), 0.9))
                for kind in kinds]
PRECONDITION += [("MRBench-mini R@5, greedy", None, lambda r: r["mrbench"]["avg"]),
                 ("MRBench-mini R@5, empty summaries", None, lambda r: r["headroom"]["empty"]),
                 ("greedy - empty", 0.0, lambda r: r["mrbench"]["avg"] - r["headroom"]["empty"])]


def precondition_table(results: list[dict]) -> str:
    """The precondition rows of eval.py results, one table per checkpoint name (`contrastive`:
    the stage-2 models; `elva-s0`, `control-s0`: what stage 3 and its control made of them), a
    column per world: mean +- sd and range over its seeds, against the targets; a target is met
    when every model meets it."""
    kinds = {}
    for r in results:
        kinds.setdefault(Path(r.get("ckpt", "")).name, []).append(r)
    return "\n\n".join(_precondition_kind(name, rs) for name, rs in kinds.items())


def _precondition_kind(name: str, results: list[dict]) -> str:
    worlds = {}
    for r in results:
        worlds.setdefault(r["world"]["seed"], []).append(r)
    head = " | ".join(f"world {w} ({len(rs)} models)" for w, rs in sorted(worlds.items()))
    lines = [f"checkpoints named {name or '-'}:", "",
             f"| row | target | {head} | models at target |", "|---|---|" + "---|" * len(worlds)
             + "---|"]

    def cell(v):
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.3f} +- {sd:.3f} ({min(v):.3f}-{max(v):.3f})"
    for row, target, get in PRECONDITION:
        cells = [cell([get(r) for r in rs]) for _, rs in sorted(worlds.items())]
        met = ("-" if target is None else
               f"{sum((get(r) > target) if target == 0 else (get(r) >= target) for r in results)}"
               f" of {len(results)}")
        goal = "-" if target is None else ("> 0" if target == 0 else f">= {target}")
        lines.append(f"| {row} | {goal} | " + " | ".join(cells) + f" | {met} |")
    # the spread over seeds needs two seeds: a world with one model shows "-" and is not counted
    sds = [statistics.stdev([r["mrbench"]["avg"] for r in rs]) if len(rs) > 1 else None
           for _, rs in sorted(worlds.items())]
    ok = [s <= 0.015 for s in sds if s is not None]
    lines.append("| MRBench-mini sd over seeds | <= 0.015 | "
                 + " | ".join("-" if s is None else f"{s:.3f}" for s in sds)
                 + f" | {sum(ok)} of {len(ok)} worlds |")
    return "\n".join(lines)


def precondition(argv):
    p = Parser(prog="python -m study precondition",
               description="precondition rows against the targets, per checkpoint name and world")
    p.add_argument("results", nargs="+", help="eval.py --out JSON files")
    results = read_results(p.parse_args(argv).results)
    check_pooled(results)           # one model counted twice, or another benchmark: refused
    print(precondition_table(results))


def ladder_table(folder: str) -> str:
    """The learnability ladder: for every stage-3 run in `folder` (one sub-folder per run, as
    `python -m study runs` writes), its reward and budget, and how its reward, KL and summaries
    moved from the first to the last fifth of its steps. t = (last - first) / the standard error of
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


# --------------------------------------------------------------------------------------------------
# curves: the training logs of some stage folders, drawn with Pillow (no plotting library)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (23, 190, 207)]


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def draw_curves(stage_dirs: list[str], out_png: str,
                keys=("infonce", "lm", "reward_mean", "R_margin", "R_rank",
                                                             "top1", "kl", "tied_groups")):
    """One panel per logged quantity, one line per stage folder (its log.jsonl), smoothed over 10
    steps."""
    from PIL import Image, ImageDraw
    logs = {}
    for d in stage_dirs:
        path = Path(d) / "log.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--curves: {path} not found; expected a stage folder written "
                                    "by train.py")
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        logs[f"{Path(d).parent.name}/{Path(d).name}"] = recs
    keys = [k for k in keys if any(k in r for recs in logs.values() for r in recs)]
    W, H, cols = 360, 240, 4
    rows = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (cols * W, rows * H + 24 + 16 * len(logs)), "white")
    draw = ImageDraw.Draw(img)
    for li, name in enumerate(logs):
        draw.line([(10, 12 + 16 * li), (30, 12 + 16 * li)], fill=PALETTE[li % len(PALETTE)],
                  width=3)
        draw.text((36, 6 + 16 * li), name, fill="black")
    top0 = 24 + 16 * len(logs)
    for ki, key in enumerate(keys):
        x0, y0 = (ki % cols) * W + 50, top0 + (ki // cols) * H + 20
        pw, ph = W - 70, H - 50
        series = {n: [(r["step"], r[key]) for r in recs if key in r] for n, recs in logs.items()}
        ys = [y for pts in series.values() for _, y in pts]
        if not ys:
            continue
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6
        # one step axis for every line
        xmax = max(x for pts in series.values() for x, _ in pts) or 1
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline="gray")
        draw.text((x0, y0 - 16), f"{key} (smoothed over 10 steps)", fill="black")
        # ticks: the value axis left, the step axis below, with their labels
        for f in (0.0, 0.5, 1.0):
            yv, xv = lo + f * (hi - lo), round(f * xmax)
            ty, tx = y0 + ph * (1 - f), x0 + pw * f
            draw.line([(x0 - 4, ty), (x0, ty)], fill="gray")
            draw.text((x0 - 48, ty - 6), f"{yv:.3g}", fill="gray")
            draw.line([(tx, y0 + ph), (tx, y0 + ph + 4)], fill="gray")
            draw.text((tx - 8, y0 + ph + 5), str(xv), fill="gray")
        draw.text((x0 + pw // 2 - 12, y0 + ph + 16), "step", fill="black")
        for li, (n, pts) in enumerate(series.items()):
            if len(pts) < 2:
                continue
            xs = [x for x, _ in pts]
            sm = _smooth([y for _, y in pts], 10)
            line = [(x0 + pw * x / xmax, y0 + ph * (1 - (y - lo) / (hi - lo)))
                    for x, y in zip(xs, sm)]
            draw.line(line, fill=PALETTE[li % len(PALETTE)], width=2)
    img.save(out_png)


def log_summary(stage_dir: str) -> str:
    """Means of the logged quantities over the first and the last fifth of a stage's steps, and
    its wall time."""
    recs = log_records(stage_dir)
    n = max(1, len(recs) // 5)
    keys = [k for k in recs[0]
            if isinstance(recs[0][k], (int, float)) and k not in ("step", "ms_per_step")]
    parts = []
    for k in keys:
        a = sum(r[k] for r in recs[:n]) / n
        b = sum(r[k] for r in recs[-n:]) / n
        parts.append(f"{k} {a:.4f} -> {b:.4f}")
    wall = recs[-1]["ms_per_step"] * len(recs) / 1000
    return (f"{stage_dir}: {len(recs)} steps, ~{wall / 60:.1f} min; first fifth -> last fifth: "
            + ", ".join(parts))


def curves(argv):
    p = Parser(prog="python -m study curves", description="draw stage folders' log.jsonl")
    p.add_argument("folders", nargs="+", help="stage folders (their log.jsonl)")
    p.add_argument("--png", default="curves.png", help="where the picture goes")
    a = p.parse_args(argv)
    draw_curves(a.folders, a.png)
    print(f"wrote {a.png}")
    for d in a.folders:
        print(log_summary(d))
