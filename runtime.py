"""
Run machinery, shared by train.py, eval.py and study.py: a reader of the paper may skip this file.

Nothing here is ELVA. It is what turns the stages into a run that can be trusted and resumed:
- flag checks (one line naming the flag, before any work), threads and the device, the run folder
  (run.json);
- the loop every stage shares (run_steps): inputs made ahead, the step, the log line, checkpoints,
  --profile;
- data parallelism under torchrun: each process takes its share of a step's global batch, one gather
  for InfoNCE's candidates, gradients averaged;
- the optimizer step with its finiteness guard;
- checkpoints, all their file I/O: written whole or not at all, verified on load, --resume.

It imports none of the stages (train.py, eval.py and study.py import it; elva.py reads checkpoints
through it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
from reward import ordered_gamma_limit


# --------------------------------------------------------------------------------------------------
# Flags: checked before any work, one line naming the flag, the value and what was expected


def fail(flag: str, value, expected: str):
    raise SystemExit(f"{flag} {value!r}: expected {expected}")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown or malformed flag) one line, like every other input
    error of the command lines: `error: ...`, no usage block (--help shows that)."""

    def error(self, message):
        raise SystemExit(f"error: {message}")


def one_line_errors(main, *argv):
    """A command line's main, run so that an input that is not what was expected (data.BadInput:
    a file, record, flag or argument; its message names it) is one line on stderr and exit code 1;
    anything else is a bug, and keeps its traceback."""
    try:
        return main(*argv)
    except data.BadInput as e:
        raise SystemExit(f"error: {e}") from None


def add_run_flags(p):
    """The run's machinery flags, a group of their own in train.py's --help."""
    add = p.add_argument_group("run machinery (runtime.py)").add_argument
    add("--resume", action="store_true", help="continue each stage from its last checkpoint in "
                                              "--out")
    add("--overwrite", action="store_true",
        help="restart an --out folder made with other world/tokenizer flags")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    add("--threads", type=int, default=None,
        help="CPU threads (default: the cores this process may use)")
    add("--workers", type=int, default=None,
        help="DataLoader processes making the next batches (default: "
        "0 on a CPU, up to 4 beside a GPU)")
    add("--compile", action="store_true", help="torch.compile every transformer block (GPU)")
    add("--log_every", type=int, default=None, help="steps between log lines")
    add("--ckpt_every", type=int, default=250, help="steps between checkpoints")
    add("--no_eval", action="store_true", help="skip the final evaluation")
    add("--profile", action="store_true",
        help="print where a step's time goes (steps 1-10 of each stage)")


def split_list(value) -> list[str]:
    """A comma list flag ("a,b" or already a list) -> its non-empty items."""
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value)


def resolve_stage_args(args, presets: dict, common: dict, n_tasks: int):
    """Fill a run's arguments from its preset (and the values every preset shares), then check
    every flag."""
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.preset not in presets:
        fail("--preset", args.preset, f"one of {list(presets)}")
    for k, v in {**common, **presets[args.preset]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"runs/{args.preset}"
    default = "contrastive,elva" if args.mbeir else "text,contrastive,elva"
    args.stages = split_list(args.stages or default)
    if not args.stages or any(s not in ("text", "contrastive", "elva") for s in args.stages):
        fail("--stages", ",".join(args.stages), "a comma list of text, contrastive and/or elva")
    if "text" in args.stages and "contrastive" not in args.stages:
        fail("--stages", ",".join(args.stages),
             "text together with contrastive (stage 2 starts from stage 1)")
    if args.mbeir is not None:
        if not (Path(args.mbeir) / "query" / "train").is_dir():
            fail("--mbeir", args.mbeir, "an M-BEIR root holding query/train/ (and cand_pool/, "
                                        "instructions/)")
        if "text" in args.stages:
            fail("--stages", ",".join(args.stages),
                 "contrastive and/or elva with --mbeir (the text stage's NLI triplets are made "
                 "from GrainWorld captions)")
    args.train_tasks = split_list(args.train_tasks)
    if isinstance(args.gamma, str):
        try:
            args.gamma = None if args.gamma == "auto" else float(args.gamma)
        except ValueError:
            fail("--gamma", args.gamma, "'auto' or a number")
    check_args(args, n_tasks)
    return args


def check_args(args, n_tasks: int):
    """Every flag's range, before any work (train.get_args calls this after filling the preset's
    values)."""
    positive_ints = ("steps", "text_steps", "rl_steps", "ckpt_every", "log_every", "rl_batch",
                     "rl_queries", "rl_pool_scenes", "num_iterations", "eval_queries",
                     "mrbench_per_task", "n_train", "n_test")
    for k in positive_ints:
        if getattr(args, k) < 1:
            fail(f"--{k}", getattr(args, k), "an integer >= 1")
    for k in ("n_hard", "n_rand"):
        if getattr(args, k) < 0:
            fail(f"--{k}", getattr(args, k), "an integer >= 0")
    if args.n_hard + args.n_rand < 1:
        fail("--n_hard + --n_rand", args.n_hard + args.n_rand, ">= 1: a ranking needs a negative")
    if args.mbeir is None and args.batch_size > args.n_train:
        fail("--batch_size", args.batch_size, f"at most the {args.n_train} training scenes "
                                              f"(--n_train) a batch is drawn from")
    if args.mbeir is None and args.n_hard + args.n_rand >= args.rl_pool_scenes:
        fail("--n_hard + --n_rand", args.n_hard + args.n_rand, f"fewer than the "
             f"{args.rl_pool_scenes} training scenes each task's mining pool starts from "
             f"(--rl_pool_scenes)")
    if args.batch_size < 2:
        fail("--batch_size", args.batch_size,
             ">= 2: with one query InfoNCE has no negative and learns nothing")
    if args.rl_batch > n_tasks * args.rl_queries:
        fail("--rl_batch", args.rl_batch, f"<= the RL instances ({n_tasks} tasks x --rl_queries "
                                         f"{args.rl_queries} = {n_tasks * args.rl_queries})")
    if args.group_size < 2:
        fail("--group_size", args.group_size, ">= 2 for GRPO: advantages need a group")
    for k in ("lr", "rl_lr", "temperature"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v > 0):
            fail(f"--{k}", v, "a finite number > 0")
    if not (math.isfinite(args.tau) and 0.005 <= args.tau <= 10):
        fail("--tau", args.tau, "a temperature in [0.005, 10] (smaller overflows the logits)")
    for k in ("beta", "alpha", "epsilon", "delta", "weight_decay", "lm_weight"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v >= 0):
            fail(f"--{k}", v, "a finite number >= 0")
    if args.gamma is not None and not (math.isfinite(args.gamma) and args.gamma >= 0):
        fail("--gamma", args.gamma, "'auto' or a finite number >= 0")
    C = 1 + args.n_hard + args.n_rand
    if args.gamma is not None and args.gamma >= ordered_gamma_limit(C):
        works = [c for c in range(2, C) if args.gamma < ordered_gamma_limit(c)]   # it falls with C
        fewer = f", or at most {works[-1]} candidates" if works else ""
        fail("--gamma", args.gamma, f"below {ordered_gamma_limit(C):.4f} at C = {C} candidates "
             f"(1 + --n_hard + --n_rand){fewer}: a larger gamma pays R_Rank more for the positive "
             f"ranked lower; 'auto' keeps the order")
    check_fractions(args, (("summary_dropout", 0, 1), ("warmup", 0, 1), ("clip_eps", 1e-6, 1),
                           ("hard_threshold", -1, 1)))
    if args.vocab_size < 300:
        fail("--vocab_size", args.vocab_size,
             ">= 300 (256 byte symbols, 5 special tokens and some merges)")
    if args.threads is not None and args.threads < 1:
        fail("--threads", args.threads, "an integer >= 1")
    if args.workers is not None and args.workers < 0:
        fail("--workers", args.workers, "an integer >= 0")
    check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail("--out", args.out, "a folder (this path is a file)")


def check_fractions(args, bounds):
    """(flag, lo, hi) triples: each flag's value, where set, lies in [lo, hi]."""
    for k, lo, hi in bounds:
        v = getattr(args, k)
        if v is not None and not lo <= v <= hi:
            fail(f"--{k}", v, f"a number in [{lo}, {hi}]")


def check_device(name: str, flag: str = "--device"):
    """A device this machine has, or auto."""
    if name not in ("auto", "cpu", "cuda", "mps") and not name.startswith("cuda:"):
        fail(flag, name, "auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(flag, name, "a device this machine has: torch sees no CUDA GPU (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail(flag, name, "a device this machine has: MPS is not available here")


# --------------------------------------------------------------------------------------------------
# Threads and the device


def default_threads() -> int:
    """Torch's CPU threads by default: OMP_NUM_THREADS when set (torchrun sets 1); else the cores
    this process may use (its CPU affinity, not the machine's count) divided by the processes
    torchrun started on this machine (LOCAL_WORLD_SIZE) -- two jobs sharing two cores ran 12x
    slower with two threads each than with one."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    return max(1, cores // (int(local) if local.isdigit() and int(local) > 0 else 1))


def default_workers(device: torch.device, workers: int | None = None) -> int:
    """DataLoader processes that make batches ahead of the model: `workers` if given, else none
    on a CPU (its cores do the model's work) and up to 4 beside a GPU."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))


def set_threads(args) -> int:
    """Torch's CPU threads: --threads, else default_threads(). Printed with where the number came
    from."""
    n = args.threads or default_threads()
    torch.set_num_threads(n)
    if args.threads:
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        why = "OMP_NUM_THREADS"
    else:
        why = "the cores this process may use / the processes on this machine"
    many = getattr(args, "world_size", 1) > 1
    where = f" | process {args.rank} of {args.world_size}" if many else ""
    print(f"threads: {n} (from {why}){where}")
    return n


def resolve_device(name: str):
    """The one device/dtype resolver: cuda, else mps, else cpu; bf16 autocast on CUDA, fp32
    elsewhere."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    dev = torch.device(name)
    autocast = cuda_autocast if dev.type == "cuda" else nullcontext
    dtype = "bf16 autocast" if dev.type == "cuda" else "fp32"
    print(f"device: {dev} | dtype: {dtype} | torch {torch.__version__}")
    return dev, autocast


def cuda_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def compile_blocks(model, args):
    """--compile: torch.compile each transformer block (ViT and decoder) in place, so parameter
    names and checkpoints stay as they are; shapes are dynamic because prompt and summary lengths
    change every batch."""
    if args.compile:
        for blk in [*model.vit, *model.blocks]:
            blk.compile(dynamic=True)


# --------------------------------------------------------------------------------------------------
# The run folder


STAGE_ORDER = ("text", "contrastive", "elva")


def stage_folders_from(args, first: str) -> list[str]:
    """The checkpoint folders of stage `first` and every stage after it (elva: --elva_name)."""
    names = [args.elva_name if s == "elva" else s for s in STAGE_ORDER]
    return names[STAGE_ORDER.index(first):]


def check_run_folder(args, shaping_args: tuple[str, ...]):
    """A run folder is one run. It belongs to one world, tokenizer and model shape (run.json,
    made by the contrastive stage): another --seed would train on another world, a saved
    tokenizer would override --vocab_size; each stage's checkpoint is checked against the flags
    when the stage opens (open_stage). --overwrite starts this run's first stage and every later
    one afresh: their folders, the evaluations, and with the contrastive stage run.json and the
    tokenizer are removed first, and the run says which. (An ELVA-only run takes its world and
    tokenizer from --init: its --seed varies only the RL sampling.)"""
    out = Path(args.out)
    if args.overwrite and args.resume:
        fail("--overwrite", True, "without --resume (--resume continues a run, --overwrite starts "
                                  "it afresh)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail("--out", args.out, f"a folder this process can write ({e.strerror})")
    if args.overwrite:
        first = next(s for s in STAGE_ORDER if s in args.stages)
        stale = [out / name for name in stage_folders_from(args, first)]
        stale += list(out.glob("eval*.json"))
        if "contrastive" in args.stages:
            stale += [out / "run.json", out / "tokenizer.json"]
        gone = [p for p in stale if p.exists()]
        for p in gone:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if gone:
            print(f"--overwrite: starting afresh from the {first} stage; removed "
                  f"{', '.join(p.name for p in gone)} from {out}")
    if "contrastive" not in args.stages:
        return
    shaping = {k: getattr(args, k) for k in shaping_args}
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for k, v in shaping.items():
            if k in old and old[k] != v:
                raise SystemExit(f"--{k} {v!r}: the folder {out} holds a run made with --{k} "
                                 f"{old[k]!r}; use another --out, the same --{k}, or --overwrite "
                                 "to start that folder afresh")
    write_json(path, shaping)


def build_tokenizer(args, texts):
    """The run's BPE tokenizer, trained once on texts() (the source's text) and kept in the run
    folder; check_run_folder made sure that a saved one was made with these arguments."""
    path = Path(args.out) / "tokenizer.json"
    if path.exists():
        return data.load_tokenizer(path)
    tok = data.train_tokenizer(texts(), args.vocab_size)
    atomic_write(path, lambda p: tok.save(str(p)))
    return tok


SHOWN_ARGS = ("preset", "out", "seed", "stages", "device", "steps", "rl_steps", "rl_lr", "beta",
              "mbeir")


def start_run(args, shaping_args: tuple[str, ...]):
    """torchrun, threads, the device, the run folder, the seed -> (device, autocast, threads), each
    printed; the run's first line shows its main arguments (config.json keeps them all)."""
    init_distributed(args)
    threads = set_threads(args)
    device, autocast = resolve_device(args.device)
    if args.rank == 0:
        check_run_folder(args, shaping_args)
    barrier(args)
    torch.manual_seed(args.seed)
    shown = [f"--{k} {','.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
             if k in SHOWN_ARGS and v is not None]
    print("args:", " ".join(shown), f"(all: {args.out}/<stage>/config.json)")
    return device, autocast, threads


def source_tokenizer(args, source, t0: float):
    """The run's tokenizer for the source's text: trained once, by the first process."""
    if args.rank == 0:
        build_tokenizer(args, source.texts)
    barrier(args)
    tok = build_tokenizer(args, source.texts)   # the first process trained and wrote it
    print(f"{source.describe} | tokenizer: {tok.get_vocab_size()} tokens "
          f"({time.time() - t0:.1f}s)")
    return source, tok


def finish_run(args, device, threads: int, t0: float, eval_tasks: str | None = None):
    """The final evaluation (evaluate_run) and the total time."""
    if not args.no_eval and args.rank == 0:
        evaluate_run(args, Path(args.out), device, threads, eval_tasks)
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    if args.preset == "smoke":
        print("(the smoke preset trains for seconds: its numbers check the plumbing, not the "
              "method; --preset cpu or gpu for results)")
    if args.world_size > 1:
        barrier(args)
        dist.destroy_process_group()


def evaluate_run(args, out: Path, device, threads: int, eval_tasks: str | None = None):
    """After training: eval.py on this run's stage-2 and stage-3 checkpoints, in its own process
    -- side by side on GrainWorld (eval.json), or with --mbeir one M-BEIR evaluation per
    checkpoint on the test split (eval_<stage>.json) of eval_tasks (mbeir.eval_tasks chose them
    before any training)."""
    ckpts = [c for c in ("contrastive", args.elva_name) if (out / c / "config.json").exists()]
    common = ["--device", str(device), "--threads", str(threads)]
    cmds = []
    if not args.mbeir:
        cmd = ["--out", str(out / "eval.json"), "--queries", str(args.eval_queries),
               "--mrbench_per_task", str(args.mrbench_per_task)]
        cmds.append(cmd + [x for c in ckpts for x in ("--ckpt", str(out / c))])
    elif eval_tasks is None:
        print(f"eval: skipped; {args.mbeir} has no test query file for the training tasks (give "
              "--eval_tasks)")
    else:
        cmds += [["--ckpt", str(out / c), "--mbeir", args.mbeir, "--tasks", eval_tasks, "--split",
                  "test", "--out", str(out / f"eval_{c}.json")] for c in ckpts]
    for cmd in cmds:
        cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), *cmd, *common]
        print("eval:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------------------------------
# Logging and --profile


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def read_log(path: Path) -> list[tuple[str, dict]]:
    """A log.jsonl's (line, record) pairs. A last line cut short (a power loss during a write) is
    dropped with a warning, as --resume cuts the log back to its checkpoint anyway; a bad line
    elsewhere is an error naming the file and line."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise data.BadInput(f"{path}:{n}: not a JSON record ({e.msg}); expected the log "
                                    f"train.py writes, one record per line") from e
            print(f"warning: {path}: its last line is cut short (a write was interrupted); "
                  f"dropping it")
    return out


def log_records(folder) -> list[dict]:
    """The records of a stage folder's log.jsonl (read_log), for the tables."""
    return [rec for _, rec in read_log(Path(folder) / "log.jsonl")]


class Logger:
    """One plain line per log step and a JSONL record per step. A fresh run starts a fresh log; a
    resumed one keeps only the records up to the checkpoint it resumed from, so a log never holds
    a step twice."""

    def __init__(self, folder: Path, stage: str, total: int, start: int, every: int,
                 writer: bool = True,
                 show: tuple[str, ...] | None = None, later: float = 0.0):
        self.writer = writer   # under torchrun only the first process writes and prints
        self.stage, self.total, self.start, self.every = stage, total, start, every
        # the keys the console line shows (None: all); the JSONL record keeps every key
        self.show = show
        # the run's later stages, in steps of this one (later_steps), for the run's ETA
        self.later = later
        self.t0 = self.printed = time.time()
        self.buffer = []       # records not yet read from the device (log with lazy=True)
        if not writer:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "log.jsonl"
        kept = []
        if start > 0 and path.exists():
            kept = [line for line, rec in read_log(path) if rec["step"] < start]
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        self.f = open(path, "a")

    def log(self, step: int, rec: dict, args=None, lazy: bool = False):
        """Record step `step`. Values may be 0-d tensors: with lazy (on a GPU), records wait in a
        buffer and are read from the device together at the next print step (one synchronisation
        per log line, not per step); otherwise at once. Under torchrun every process calls this;
        the values are averaged over processes."""
        self.buffer.append((step, time.time(), rec))
        if lazy and not (step % self.every == 0 or step == self.total - 1):
            return
        buffered, self.buffer = self.buffer, []
        # every tensor value of the buffered records, read from the device at once
        tensors = [v.detach().float().reshape(()) for _, _, r in buffered for v in r.values()
                   if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        for step_i, t, r in buffered:
            vals = {k: next(read) if isinstance(v, torch.Tensor) else v for k, v in r.items()}
            self._write(step_i, t, averaged(vals, args))

    def _write(self, step: int, now: float, rec: dict):
        if not self.writer:
            return
        elapsed = now - self.t0
        done = step + 1 - self.start
        ms = 1000 * elapsed / max(1, done)
        rec = {"stage": self.stage, "step": step, "ms_per_step": round(ms, 1), **rec}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        last = step == self.total - 1
        if step % self.every == 0 or last or now - self.printed >= 10:   # and at least every 10 s
            self.printed = now
            eta = (self.total - step - 1) * ms / 1000
            shown = [(k, v) for k, v in rec.items() if k not in ("stage", "step", "ms_per_step")
                     and (self.show is None or k in self.show)]
            parts = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in shown)
            run = ""
            if self.later:
                run = f" | run eta ~{(eta + self.later * ms / 1000) / 60:.0f} min + eval"
            print(f"{self.stage} {step:05d}/{self.total} | {parts} | {ms:.0f} ms/step "
                  f"| eta {eta / 60:.1f} min{run}", flush=True)


# The cost of a step of each stage relative to a stage-2 step, measured on the cpu preset with one
# thread (stage 1 1.1 s, stage 2 1.2 s, stage 3 1.7 s per step): a rough guide for the run's ETA,
# not a promise.
STEP_COST = {"text": 0.9, "contrastive": 1.0, "elva": 1.4}


def later_steps(args, stage: str) -> float:
    """The steps of the stages this run has after `stage`, in units of one `stage` step
    (STEP_COST)."""
    order = [s for s in ("text", "contrastive", "elva") if s in args.stages]
    steps = {"text": args.text_steps, "contrastive": args.steps, "elva": args.rl_steps}
    kind = "elva" if stage not in steps else stage
    return sum(steps[s] * STEP_COST[s] for s in order[order.index(kind) + 1:]) / STEP_COST[kind]


def phase(name: str):
    """Label a phase of a step for --profile (torch.profiler.record_function: next to free when
    not profiling)."""
    return torch.profiler.record_function(f"phase/{name}")


class Profiler:
    """--profile: runs torch.profiler over steps first..first+n-1 of a stage, then prints the
    mean milliseconds per step of each phase() label and of the whole step (wall clock). On CUDA
    the table also shows the GPU's time per phase, so a reader sees whether the GPU waits on the
    host."""

    def __init__(self, enabled: bool, stage: str, start: int, total: int, n: int = 10):
        self.enabled, self.stage = enabled, stage
        self.first = min(start + 1, total - 1)         # step `start` warms up (allocations, caches)
        self.last = min(self.first + n, total) - 1
        self.prof, self.t0 = None, 0.0

    def step_begins(self, step: int):
        if self.enabled and step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
            self.t0 = time.perf_counter()

    def step_ends(self, step: int):
        if self.prof is None or step != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - self.t0) * 1000
        self.prof.stop()
        n = self.last - self.first + 1
        rows = [(e.key[len("phase/"):], e.cpu_time_total / 1000 / n,
                 getattr(e, "device_time_total", 0) / 1000 / n)
                for e in self.prof.key_averages() if e.key.startswith("phase/")]
        print(f"{self.stage} profile, steps {self.first}-{self.last} (ms per step; host time "
              "includes the host's waits on the GPU):")
        print("| phase | host ms | GPU ms |\n|---|---|---|")
        for name, host, dev in sorted(rows, key=lambda r: -r[1]):
            print(f"| {name} | {host:.1f} | {dev:.1f} |")
        print(f"| whole step (wall) | {wall / n:.1f} | |", flush=True)
        self.prof = None


# --------------------------------------------------------------------------------------------------
# The stage loop. Every stage is: a model and its optimizer, --resume's checkpoint, the steps'
# inputs made ahead, then per step the stage's own step function (train.py's: the paper) and the
# same bookkeeping.


@dataclass
class Stage:
    """A stage's run state: what run_steps needs besides the step itself."""
    name: str                       # the stage's folder name and log label
    folder: Path                    # its checkpoint folder
    steps: int                      # its optimizer steps
    retriever: object               # elva.Retriever: the model being trained and its tokenizer
    opt: torch.optim.Optimizer      # made by adamw()
    meta: dict             # what its checkpoints record beside the weights (data, arguments, stage)
    start: int = 0                 # the first step still to run (0, or after --resume's checkpoint)


# The flags that do not shape a stage's steps: where it runs, what it prints, what it is named.
NOT_SHAPING = {"resume", "overwrite", "device", "threads", "workers", "compile", "log_every",
               "ckpt_every", "no_eval", "profile", "out", "stages", "init", "rank", "eval_queries",
               "mrbench_per_task", "eval_tasks", "elva_name", "probe_every"}


def model_sha(folder) -> str:
    """The sha256 of a checkpoint's weights, as its config.json names them."""
    return read_manifest(folder)["files"]["model"]["sha256"]


def check_stage_folder(args, name: str, folder: Path, init) -> None:
    """A stage's folder holds one run of it: a checkpoint there is continued (--resume) only with
    the flags it was made with and from the same input stage; without --resume (or --overwrite,
    which check_run_folder applied) it is not written over."""
    if not (folder / "config.json").exists():
        return
    meta = read_manifest(folder)
    if not args.resume:
        raise SystemExit(f"{folder} holds a checkpoint of the {name} stage (step {meta.get('step')}"
                         f"): --resume continues it, --overwrite starts it and the later stages "
                         f"afresh, or choose another --out")
    for k, recorded in meta.get("args", {}).items():
        now = json.loads(json.dumps(getattr(args, k, recorded)))
        if k not in NOT_SHAPING and now != recorded:
            fail(f"--{k}", getattr(args, k), f"{recorded!r}, the value the {name} checkpoint in "
                 f"{folder} was made with (--resume continues a stage with its own flags; "
                 f"--overwrite starts it afresh)")
    if init is not None and meta.get("init_sha256") not in (None, model_sha(init)):
        fail(f"the {name} stage's input", str(init), f"the checkpoint {folder} started from (it "
             f"changed since: the {name} stage is not complete; --overwrite starts it afresh)")


def open_stage(args, name: str, steps: int, retriever, opt, meta: dict, device,
               init=None) -> Stage | None:
    """A stage in --out/name, from `init` (the checkpoint it starts from, if any): with --resume
    and a checkpoint there, checked (check_stage_folder) and its weights and optimizer state
    restored. None (and a line saying so) when that checkpoint already holds every step."""
    folder = Path(args.out) / name
    if args.rank == 0:
        check_stage_folder(args, name, folder, init)
    barrier(args)
    if init is not None:
        meta = {**meta, "init_sha256": model_sha(init)}
    start = resume_point(args, folder, retriever.model, opt, name, device)
    if start >= steps:
        print(f"{name}: already complete ({steps} steps) in {folder}")
        return None
    return Stage(name, folder, steps, retriever, opt, meta, start)


def run_steps(args, stage: Stage, inputs, step_fn, show: tuple[str, ...] | None = None, gen=None):
    """The loop of every stage: per step its inputs (made ahead, in step order), step_fn(step,
    inputs) -> the step's log record, the log line, the device's verdicts on the updates read at
    each log step (a fused optimizer's finiteness check), --profile, and a checkpoint every
    ckpt_every steps and at the end. gen: a generator seeded per step and process (seed_step), so
    that --resume replays the same sampling."""
    logger = Logger(stage.folder, stage.name, stage.steps, stage.start, args.log_every,
                    rank_of(args) == 0,
                    show=show, later=later_steps(args, stage.name))
    prof = Profiler(args.profile, stage.name, stage.start, stage.steps)
    lazy = stage.retriever.device.type == "cuda"   # on a GPU the log reads the device once per line
    for step in range(stage.start, stage.steps):
        prof.step_begins(step)
        if gen is not None:
            seed_step(gen, args, step)
        with phase("data"):
            made = next(inputs)
        rec = step_fn(step, made)
        logger.log(step, rec, args, lazy=lazy)
        if step % args.log_every == 0:
            check_updates(stage.opt)
        prof.step_ends(step)
        if (step + 1) % args.ckpt_every == 0 or step == stage.steps - 1:
            save(stage, step, args)


def step_seed(args, step: int) -> int:
    """The sampling's seed of a step: from the run's seed and the step, and different on each
    process (each samples its own rollouts)."""
    return args.seed * 100003 + step + 7919 * rank_of(args)


def seed_step(gen: torch.Generator, args, step: int):
    gen.manual_seed(step_seed(args, step))


class StepStream(torch.utils.data.IterableDataset):
    """The inputs of steps start..stop-1, one per item: encode(share(make(step), args)) -- the
    step's global batch (from its seed), this process's share of it, its tensors. With n
    DataLoader workers, worker w makes steps start + w, start + w + n, ...; the DataLoader hands
    them back round-robin, so in step order."""

    def __init__(self, args, make, share, encode, start: int, stop: int):
        self.args, self.make, self.share, self.encode = args, make, share, encode
        self.start, self.stop = start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.encode(self.share(self.make(step), self.args))


def step_inputs(args, make, share, encode, start: int, stop: int, device):
    """Iterate over the steps' inputs (StepStream): made in DataLoader workers ahead of the step
    (--workers), in pinned memory beside a GPU, so that rendering and tokenising overlap the
    device's work; in place with 0."""
    workers = default_workers(device, args.workers)
    # workers are forked after the tokenizer is made
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stream = StepStream(args, make, share, encode, start, stop)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                            pin_memory=device.type == "cuda",
                                            prefetch_factor=2 if workers else None))


def serializable(args) -> dict:
    """The run's arguments as JSON-ready values."""
    return dict(vars(args))


# --------------------------------------------------------------------------------------------------
# Data parallelism (torchrun). Every process builds the same global batch from the same per-step
# seed and takes its share; gradients are averaged over the processes before the optimizer step, so
# the processes keep identical weights. This is what DistributedDataParallel does, written out: our
# model is driven through several methods (generate, token_logprobs, shared_prefix_logprobs), not
# one forward() that DDP could wrap. Without torchrun every helper here is the identity.


def init_distributed(args):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (NCCL), or per CPU
    share (gloo)."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return
    for name, n in (("--batch_size", args.batch_size), ("--rl_batch", args.rl_batch)):
        if n % args.world_size:
            fail(name, n, f"a multiple of the {args.world_size} processes (each takes an equal "
                          "share)")
    if args.rank > 0:   # one voice: only the first process prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    nccl = torch.cuda.is_available() and not args.device.startswith("cpu")
    dist.init_process_group("nccl" if nccl else "gloo")
    if nccl:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"


def world_of(args) -> int:
    return getattr(args, "world_size", 1) if args is not None else 1


def rank_of(args) -> int:
    return getattr(args, "rank", 0) if args is not None else 0


def barrier(args):
    if world_of(args) > 1:
        dist.barrier()


def my_share(xs, args, rank: int | None = None):
    """This process's contiguous share of a global batch (a list or a tensor's rows)."""
    n = len(xs) // world_of(args)
    r = rank_of(args) if rank is None else rank
    return xs[r * n:(r + 1) * n]


def my_part(batch: dict, args) -> dict:
    """This process's share of a stage-1/2 global batch, whose per-item lists are laid out as
    `blocks` equal blocks of B (the queries, then each query's candidates: its positives, then
    any extras): rows r*b..(r+1)*b of every block, and those rows of the false-negative mask (B,
    (blocks - 1) * B) with its columns in the order gather_candidates lays the candidates out:
    process 0's candidate blocks, then process 1's, ..."""
    W, r, n_blocks = world_of(args), rank_of(args), batch["blocks"]
    B = len(batch["items"]) // n_blocks
    b = B // W
    rows = [k * B + r * b + i for k in range(n_blocks) for i in range(b)]
    cols = [k * B + p * b + i for p in range(W) for k in range(n_blocks - 1) for i in range(b)]
    part = {k: [v[j] for j in rows] for k, v in batch.items() if isinstance(v, list)}
    false_neg = batch["false_neg"][r * b:(r + 1) * b][:, cols]           # (b, W * (blocks - 1) * b)
    return {**part, "false_neg": false_neg, "n_queries": b}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every process the gradient of the summed losses w.r.t. its
    own rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                            # every process's loss depends on every row
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather_candidates(ec: torch.Tensor, args) -> tuple[torch.Tensor, int]:
    """InfoNCE's candidates from every process (gradients flow back to their owners) -> (all
    candidates, where this process's first candidate sits among them)."""
    if world_of(args) == 1:
        return ec, 0
    return _GatherWithGrad.apply(ec), rank_of(args) * ec.shape[0]


def batch_mean(total: torch.Tensor, count: torch.Tensor, args) -> torch.Tensor:
    """total / count over the whole global batch: under torchrun the counts of every process
    summed, so that the gradients averaged over processes are those of the whole batch's mean."""
    if world_of(args) == 1:
        return total / count.clamp(min=1)
    n = count.float()
    dist.all_reduce(n)
    return total * world_of(args) / n.clamp(min=1)


def global_tokens(mask: torch.Tensor, args, norm: str = "token") -> float | None:
    """Under torchrun: the sampled tokens (norm "sequence": the summaries with a sampled token)
    of the whole batch / the processes, so that grpo_loss's mean averaged over the processes is
    the mean over the whole batch. None (the local count) otherwise."""
    if world_of(args) == 1:
        return None
    n = (mask.sum() if norm == "token" else mask.any(1).sum()).float()
    dist.all_reduce(n)
    return float(n) / world_of(args)


def average_gradients(model, args):
    """Average every trainable parameter's gradient over the processes, in one flat all_reduce."""
    if world_of(args) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    # a share without images
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_of(args)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g


def collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL has no CPU collectives, gloo takes CPU
    tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_process(flag: torch.Tensor, args, read: bool = True):
    """A 0-d bool flag, true if it is true on any process (one all_reduce under torchrun). read:
    as a Python bool (a host synchronisation), else as a tensor on the flag's device."""
    if world_of(args) > 1:
        f = flag.to(collective_device(), torch.float32)
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        flag = f.to(flag.device) > 0
    return bool(flag) if read else flag


def averaged(rec: dict, args) -> dict:
    """A log record's numbers averaged over the processes (the global batch's values)."""
    if world_of(args) == 1:
        return rec
    keys = [k for k, v in rec.items() if isinstance(v, (int, float))]
    v = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(v)
    return {**rec, **{k: x / world_of(args) for k, x in zip(keys, v.tolist())}}


# --------------------------------------------------------------------------------------------------
# The optimizer and its guard: a non-finite loss or gradient is never applied


def adamw(params, lr: float, weight_decay: float, device, stage: str,
          folder) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.98; fused on CUDA) that knows its stage and checkpoint folder and
    counts its updates, so that the guard's messages name the step and the checkpoint that is
    kept."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98),
                            fused=torch.device(device).type == "cuda")
    opt.stage, opt.folder, opt.updates = stage, Path(folder), 0
    return opt


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def last_good(folder: Path) -> str:
    """What a stop leaves behind, for the error message."""
    try:
        return f"the last checkpoint in {folder} (step {read_manifest(folder)['step']}) is kept"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint of this stage was written to {folder}"


def optimizer_step(opt: torch.optim.Optimizer, model, loss: torch.Tensor,
                   args=None) -> torch.Tensor:
    """Check the loss and the gradient are finite, backward, average the gradients over processes
    (torchrun), clip the gradient norm to 1, step. A non-finite loss or gradient stops the run
    before the update is applied (and so before anything is saved). -> pre-clip grad norm. opt comes
    from adamw(): its update count is the step the messages name (one update per step in every stage
    of the paper).

    With a fused AdamW (on CUDA) the check costs no host synchronisation: the optimizer is told
    on the device (found_inf, the mechanism of torch's GradScaler) to skip an update whose loss
    or gradient is not finite, and the host reads the verdicts at the next log step or checkpoint
    (check_updates), where the run stops."""
    fused = opt.defaults.get("fused")
    where = f"{opt.stage} step {opt.updates}"
    # every process stops, or none
    if not fused and any_process(~torch.isfinite(loss.detach()), args):
        what = "another process's loss is not finite"
        if not torch.isfinite(loss):
            what = f"the loss is {loss.item()}"
        raise FloatingPointError(f"{where}: {what}; stopping before applying it; "
                                 f"{last_good(opt.folder)}")
    opt.zero_grad(set_to_none=True)
    with phase("backward"):
        loss.backward()
        average_gradients(model, args)
    with phase("optimizer"):
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # the check on the device: found_inf = 1 skips the update; check_updates reads it later
        if fused:
            bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))
            # the same verdict on every process
            opt.found_inf = any_process(bad, args, read=False).float()
            opt.step()
            pending = (opt.updates, opt.found_inf, loss.detach(), gnorm.detach())
            opt.pending = getattr(opt, "pending", []) + [pending]
            opt.found_inf = None
        elif not torch.isfinite(gnorm):
            raise FloatingPointError(f"{where}: the gradient norm is {gnorm.item()}; stopping "
                                     f"before applying it; {last_good(opt.folder)}")
        else:
            opt.step()
    opt.updates += 1
    return gnorm


def check_updates(opt: torch.optim.Optimizer):
    """Read the verdicts of the updates a fused optimizer checked on the device (optimizer_step),
    in one synchronisation: stop at the first step whose loss or gradient was not finite (its
    update was not applied)."""
    pending, opt.pending = getattr(opt, "pending", []), []
    if not pending:
        return
    values = torch.stack([torch.stack([f.float(), l.float(), g.float()])
                          for _, f, l, g in pending]).tolist()
    for (step, _, _, _), (skipped, loss, gnorm) in zip(pending, values):
        if not skipped:
            continue
        if not math.isfinite(loss):
            what = f"the loss is {loss}"
        elif not math.isfinite(gnorm):
            what = f"the gradient norm is {gnorm}"
        else:
            what = "another process's loss was not finite"
        raise FloatingPointError(f"{opt.stage} step {step}: {what}; its update was not applied; "
                                 f"stopping; {last_good(opt.folder)}")


# --------------------------------------------------------------------------------------------------
# Checkpoints: one folder, written as a unit. The weights (and the optimizer state, for --resume) go
# to files named by the step, then config.json is renamed into place: it names those files with
# their sha256 and is the commit point. A crash before that rename leaves the previous config.json
# naming the previous files, which are deleted only after it. So a folder always holds one whole
# checkpoint (or none); the loader verifies the hashes and refuses a mixed set.


def atomic_write(path: Path, write):
    """write(tmp) then rename tmp over path: atomic on POSIX, so a crash leaves the old file or
    the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_state(opt: torch.optim.Optimizer, model) -> dict:
    """AdamW state as named tensors for safetensors (no pickles): exp_avg / exp_avg_sq / step per
    parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    state = {}
    for p, s in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            state[f"{names[p]}::{k}"] = s[k].detach().cpu().contiguous()
        state[f"{names[p]}::step"] = torch.as_tensor(s["step"]).float().reshape(1).cpu()
    return state


def save_checkpoint(folder, model, tok, extra: dict | None = None, optimizer=None):
    """Write model-<step>.safetensors (+ optimizer-<step>.safetensors), tokenizer.json, then
    config.json: the model's config (model.cfg), `extra` (the run's arguments, data and step) and
    the files with their hashes."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    tag = f"{extra['step']:06d}" if "step" in extra else "final"
    files = {"model": f"model-{tag}.safetensors", "tokenizer": "tokenizer.json"}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / files["model"], lambda p: save_file(state, str(p)))
    if optimizer is not None:
        files["optimizer"] = f"optimizer-{tag}.safetensors"
        opt_state = optimizer_state(optimizer, model)
        atomic_write(folder / files["optimizer"], lambda p: save_file(opt_state, str(p)))
    atomic_write(folder / files["tokenizer"], lambda p: tok.save(str(p)))
    hashes = {k: {"name": v, "sha256": sha256(folder / v)} for k, v in files.items()}
    meta = {"model": asdict(model.cfg), **extra}
    hashes["config"] = {"name": "config.json", "sha256": content_sha(meta)}   # its own content too
    write_json(folder / "config.json", {**meta, "files": hashes})   # the commit point
    keep = set(files.values())
    for old in [*folder.glob("model-*.safetensors"), *folder.glob("optimizer-*.safetensors")]:
        if old.name not in keep:
            old.unlink()


def content_sha(meta: dict) -> str:
    """The sha256 of a manifest's content (all but its list of files), in a canonical form."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def read_manifest(folder, need: tuple[str, ...] = ("model", "tokenizer", "optimizer")) -> dict:
    """config.json of a checkpoint folder: its content unedited (its own hash) and every file it
    names among `need` present and matching its sha256 (inference needs no optimizer state)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise data.MissingInput(f"checkpoint {folder}: missing config.json; expected a folder "
                                f"written by train.py")
    try:
        meta = json.loads(path.read_text())
        files = meta["files"]
        dict(meta["model"])
        [files[k]["sha256"] for k in ("model", "tokenizer")]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise data.BadInput(f"checkpoint {folder}: config.json is not a checkpoint manifest "
                            f"written by train.py ({type(e).__name__}: {e})") from e
    content = {k: v for k, v in meta.items() if k != "files"}
    if "config" in files and files["config"].get("sha256") != content_sha(content):
        raise data.BadInput(f"checkpoint {folder}: config.json was edited after it was written "
                            "(its content no longer matches its sha256): the model it describes "
                            "is not the one saved; refusing to load it")
    for key, f in files.items():
        if key == "config" or key not in need:
            continue
        where = f"checkpoint {folder}: {f['name']}"
        if not (folder / f["name"]).is_file():
            raise data.MissingInput(f"checkpoint {folder}: missing {f['name']} named by "
                                    f"config.json (step {meta.get('step')}); the folder is "
                                    f"incomplete")
        if sha256(folder / f["name"]) != f["sha256"]:
            raise data.BadInput(f"{where} does not match the sha256 in config.json (step "
                                f"{meta.get('step')}): a mixed or damaged checkpoint; refusing to "
                                f"load it")
    return meta


def read_checkpoint(folder) -> tuple[dict, object, dict]:
    """A verified checkpoint folder -> (its weights as a state dict, its tokenizer, its
    manifest); elva.py builds the model from them."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = read_manifest(folder, need=("model", "tokenizer"))
    tok = data.load_tokenizer(folder / meta["files"]["tokenizer"]["name"])
    weights = folder / meta["files"]["model"]["name"]
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise data.BadInput(f"checkpoint {folder}: {weights.name} is corrupt or not safetensors "
                         f"({e})") from e
    return state, tok, meta


def load_optimizer(folder, opt: torch.optim.Optimizer, model, meta: dict | None = None) -> bool:
    """Restore the AdamW state saved with a checkpoint (meta: its manifest, if already read and
    verified). Returns False (and the caller says so) if it has none."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = meta or read_manifest(folder)
    if "optimizer" not in meta["files"]:
        return False
    state = load_file(str(folder / meta["files"]["optimizer"]["name"]))
    # through load_state_dict, so that torch places each tensor where this optimizer wants it (a
    # fused or capturable AdamW keeps `step` on the parameter's device, a plain one on the CPU)
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd["state"] = {index[id(p)]: {"step": state[f"{n}::step"][0].clone(),
                                  "exp_avg": state[f"{n}::exp_avg"],
                                  "exp_avg_sq": state[f"{n}::exp_avg_sq"]}
                   for n, p in model.named_parameters()
                   if f"{n}::exp_avg" in state and id(p) in index}
    opt.load_state_dict(sd)
    return True


def save(stage: Stage, step: int, args=None):
    """A checkpoint of the stage at `step` (weights + optimizer state, written as a unit) --
    never of non-finite weights, and never past an update the device refused (check_updates)."""
    model, opt = stage.retriever.model, stage.opt
    check_updates(opt)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise FloatingPointError(f"{stage.name} step {step}: the weights became non-finite "
                                 f"({bad[0]}{more}); not saving them; {last_good(stage.folder)}")
    if rank_of(args) == 0:   # one writer: every process holds the same weights
        save_checkpoint(stage.folder, model, stage.retriever.tok, {**stage.meta, "step": step},
                        optimizer=opt)
    barrier(args)


def resume_point(args, folder: Path, model, opt, stage: str, device) -> int:
    """With --resume and a checkpoint in `folder`: load its weights and optimizer state (hashes
    verified) into model and opt. -> the first step still to run (0 when starting afresh), which
    is also the optimizer's update count."""
    if not (args.resume and (folder / "config.json").exists()):
        return 0
    state, _, meta = read_checkpoint(folder)
    model.load_state_dict(state)
    if not load_optimizer(folder, opt, model, meta):
        print(f"{stage}: warning: {folder} holds no optimizer state; resuming with a fresh AdamW")
    print(f"{stage}: resumed from {folder} at step {meta['step'] + 1} (weights, optimizer state "
          "and tokenizer verified against config.json)")
    opt.updates = meta["step"] + 1
    return meta["step"] + 1
