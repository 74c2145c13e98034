"""
Run machinery, shared by train.py and study.py: a reader of the paper may skip this file.

Nothing here is ELVA. It is what turns the stages into a run that can be trusted and resumed:
- flag checks (one line naming the flag, before any work) and the run folder (run.json: a folder keeps one world);
- threads, --compile, the learning-rate schedule;
- logging (one plain line per log step, a JSONL record per step) and --profile's phase table;
- data parallelism under torchrun (each process takes its share of a global batch, gradients averaged);
- the optimizer step with its finiteness guard, checkpoints written whole or not at all, --resume;
- DataLoader streams that make each step's inputs from the step's seed, ahead of the step.

It imports none of the stages (train.py, study.py import it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import elva

# ----------------------------------------------------------------------------------------------------------------------
# Flags: checked before any work, one line naming the flag, the value and what was expected


def fail(flag: str, value, expected: str):
    raise SystemExit(f"{flag} {value!r}: expected {expected}")


def add_run_flags(p):
    """The run's machinery flags, a group of their own in train.py's --help."""
    add = p.add_argument_group("run machinery (runtime.py)").add_argument
    add("--resume", action="store_true", help="continue each stage from its last checkpoint in --out")
    add("--overwrite", action="store_true", help="restart an --out folder made with other world/tokenizer flags")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    add("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    add("--workers", type=int, default=None, help="DataLoader processes making the next batches (default: 0 on a "
        "CPU, up to 4 beside a GPU)")
    add("--compile", action="store_true", help="torch.compile every transformer block (GPU)")
    add("--log_every", type=int, default=None, help="steps between log lines")
    add("--ckpt_every", type=int, default=250, help="steps between checkpoints")
    add("--no_eval", action="store_true", help="skip the final evaluation")
    add("--profile", action="store_true", help="print where a step's time goes (steps 1-10 of each stage)")


def resolve_stage_args(args, presets: dict, common: dict, n_tasks: int):
    """Fill a run's arguments from its preset (and the values every preset shares), then check every flag."""
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.preset not in presets:
        fail("--preset", args.preset, f"one of {list(presets)}")
    for k, v in {**common, **presets[args.preset]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"runs/{args.preset}"
    args.stages = args.stages or ("contrastive,elva" if args.mbeir else "text,contrastive,elva")
    if isinstance(args.stages, str):
        args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not args.stages or any(s not in ("text", "contrastive", "elva") for s in args.stages):
        fail("--stages", ",".join(args.stages), "a comma list of text, contrastive and/or elva")
    if "text" in args.stages and "contrastive" not in args.stages:
        fail("--stages", ",".join(args.stages), "text together with contrastive (stage 2 starts from stage 1)")
    if args.mbeir is not None:
        if not (Path(args.mbeir) / "query" / "train").is_dir():
            fail("--mbeir", args.mbeir, "an M-BEIR root holding query/train/ (and cand_pool/, instructions/)")
        if "text" in args.stages:
            fail("--stages", ",".join(args.stages), "contrastive and/or elva with --mbeir (the text stage's NLI "
                                                    "triplets are made from GrainWorld captions)")
    if isinstance(args.train_tasks, str):
        args.train_tasks = [t.strip() for t in args.train_tasks.split(",") if t.strip()]
    if isinstance(args.gamma, str):
        try:
            args.gamma = None if args.gamma == "auto" else float(args.gamma)
        except ValueError:
            fail("--gamma", args.gamma, "'auto' or a number")
    check_args(args, n_tasks)
    return args


def check_args(args, n_tasks: int):
    """Every flag's range, before any work (train.get_args calls this after filling the preset's values)."""
    positive_ints = ("steps", "text_steps", "rl_steps", "ckpt_every", "log_every", "rl_batch", "rl_queries",
                     "rl_pool_scenes", "num_iterations", "eval_queries", "mrbench_per_task", "n_train", "n_test")
    for k in positive_ints:
        if getattr(args, k) < 1:
            fail(f"--{k}", getattr(args, k), "an integer >= 1")
    for k in ("n_hard", "n_rand"):
        if getattr(args, k) < 0:
            fail(f"--{k}", getattr(args, k), "an integer >= 0")
    if args.n_hard + args.n_rand < 1:
        fail("--n_hard + --n_rand", args.n_hard + args.n_rand, ">= 1: a ranking needs a negative")
    if args.batch_size < 2:
        fail("--batch_size", args.batch_size, ">= 2: with one query InfoNCE has no negative and learns nothing")
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
    check_fractions(args, (("summary_dropout", 0, 1), ("warmup", 0, 1), ("clip_eps", 1e-6, 1),
                           ("hard_threshold", -1, 1)))
    if args.vocab_size < 300:
        fail("--vocab_size", args.vocab_size, ">= 300 (256 byte symbols, 5 special tokens and some merges)")
    if args.threads is not None and args.threads < 1:
        fail("--threads", args.threads, "an integer >= 1")
    if args.workers is not None and args.workers < 0:
        fail("--workers", args.workers, "an integer >= 0")
    if args.device not in ("auto", "cpu", "cuda", "mps") and not args.device.startswith("cuda:"):
        fail("--device", args.device, "auto, cpu, cuda, cuda:N or mps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device", args.device, "a device this machine has: torch sees no CUDA GPU here (try --device cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        fail("--device", args.device, "a device this machine has: MPS is not available here")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail("--out", args.out, "a folder (this path is a file)")


def check_fractions(args, bounds):
    """(flag, lo, hi) triples: each flag's value, where set, lies in [lo, hi]."""
    for k, lo, hi in bounds:
        v = getattr(args, k)
        if v is not None and not lo <= v <= hi:
            fail(f"--{k}", v, f"a number in [{lo}, {hi}]")


def set_threads(args) -> int:
    """Torch's CPU threads: --threads, else OMP_NUM_THREADS, else the cores this process may use divided by the
    processes torchrun started beside it (elva.default_threads). Printed with where the number came from."""
    n = args.threads or elva.default_threads()
    torch.set_num_threads(n)
    why = "--threads" if args.threads else ("OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else
                                            "the cores this process may use / the processes on this machine")
    print(f"threads: {n} (from {why})" + (f" | process {args.rank} of {args.world_size}"
                                          if getattr(args, "world_size", 1) > 1 else ""))
    return n


def check_run_folder(args, shaping_args: tuple[str, ...]):
    """A run folder belongs to one world, tokenizer and model shape (run.json), which the contrastive stage makes.
    Refuse to mix: a saved tokenizer would silently override --vocab_size, another --seed would train on another
    world. (An ELVA-only run takes its world and tokenizer from --init: its --seed varies only the RL sampling.)"""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail("--out", args.out, f"a folder this process can write ({e.strerror})")
    if "contrastive" not in args.stages:
        return
    shaping = {k: getattr(args, k) for k in shaping_args}
    path = out / "run.json"
    if path.exists() and not args.overwrite:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for k, v in shaping.items():
            if k in old and old[k] != v:
                raise SystemExit(f"--{k} {v!r}: the folder {out} holds a run made with --{k} {old[k]!r}; use another "
                                 f"--out, the same --{k}, or --overwrite to start that folder afresh")
    elif args.overwrite:
        for stale in ("tokenizer.json", "eval.json"):
            (out / stale).unlink(missing_ok=True)
    elva._atomic_write(path, lambda p: p.write_text(json.dumps(shaping, indent=2)))


def build_tokenizer(args, texts):
    """The run's BPE tokenizer, trained once on texts() (the source's text) and kept in the run folder;
    check_run_folder made sure that a saved one was made with these arguments."""
    path = Path(args.out) / "tokenizer.json"
    if path.exists():
        return data.load_tokenizer(path)
    tok = data.train_tokenizer(texts(), args.vocab_size)
    elva._atomic_write(path, lambda p: tok.save(str(p)))
    return tok


def evaluate_run(args, out: Path, device, threads: int):
    """After training on GrainWorld: eval.py on this run's stage-2 and stage-3 checkpoints, side by side (eval.py is
    a program of its own, run in its own process)."""
    ckpts = [c for c in ("contrastive", args.elva_name) if (out / c / "config.json").exists()]
    cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), "--out", str(out / "eval.json"),
           "--queries", str(args.eval_queries), "--mrbench_per_task", str(args.mrbench_per_task),
           "--device", str(device), "--threads", str(threads)]
    for c in ckpts:
        cmd += ["--ckpt", str(out / c)]
    print("eval:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def compile_blocks(model, args):
    """--compile: torch.compile each transformer block (ViT and decoder) in place, so parameter names and checkpoints
    stay as they are; shapes are marked dynamic because prompt and summary lengths change from batch to batch."""
    if args.compile:
        for blk in [*model.vit, *model.blocks]:
            blk.compile(dynamic=True)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Logger:
    """One plain line per log step and a JSONL record per step. A fresh run starts a fresh log; a resumed one keeps
    only the records up to the checkpoint it resumed from, so a log never holds a step twice."""

    def __init__(self, folder: Path, stage: str, total: int, start: int, every: int, writer: bool = True,
                 show: tuple[str, ...] | None = None, later: float = 0.0):
        self.writer = writer   # under torchrun only the first process writes and prints
        self.stage, self.total, self.start, self.every = stage, total, start, every
        self.show = show       # the keys the console line shows (None: all); the JSONL record keeps every key
        self.later = later     # the run's later stages, in steps of this one (later_steps), for the run's ETA
        self.t0 = self.printed = time.time()
        self.buffer = []       # records not yet read from the device (log with lazy=True)
        if not writer:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "log.jsonl"
        kept = []
        if start > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start]
        elva._atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        self.f = open(path, "a")

    def log(self, step: int, rec: dict, args=None, lazy: bool = False):
        """Record step `step`. Values may be 0-d tensors: with lazy (on a GPU), records wait in a buffer and are
        read from the device together at the next print step (one synchronisation per log line, not per step);
        otherwise at once. Under torchrun every process calls this; the values are averaged over processes."""
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
        if step % self.every == 0 or step == self.total - 1 or now - self.printed >= 10:   # and at least every 10 s
            self.printed = now
            eta = (self.total - step - 1) * ms / 1000
            parts = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                               if k not in ("stage", "step", "ms_per_step") and (self.show is None or k in self.show))
            run = f" | run eta ~{(eta + self.later * ms / 1000) / 60:.0f} min + eval" if self.later else ""
            print(f"{self.stage} {step:05d}/{self.total} | {parts} | {ms:.0f} ms/step | eta {eta / 60:.1f} min{run}",
                  flush=True)


# The cost of a step of each stage relative to a stage-2 step, measured on the cpu preset with one thread (stage 1
# 1.1 s, stage 2 1.2 s, stage 3 1.7 s per step): a rough guide for the run's ETA, not a promise.
STEP_COST = {"text": 0.9, "contrastive": 1.0, "elva": 1.4}


def later_steps(args, stage: str) -> float:
    """The steps of the stages this run has after `stage`, in units of one `stage` step (STEP_COST)."""
    order = [s for s in ("text", "contrastive", "elva") if s in args.stages]
    steps = {"text": args.text_steps, "contrastive": args.steps, "elva": args.rl_steps}
    kind = "elva" if stage not in steps else stage
    return sum(steps[s] * STEP_COST[s] for s in order[order.index(kind) + 1:]) / STEP_COST[kind]


def phase(name: str):
    """Label a phase of a step for --profile (torch.profiler.record_function: next to free when not profiling)."""
    return torch.profiler.record_function(f"phase/{name}")


class Profiler:
    """--profile: runs torch.profiler over steps first..first+n-1 of a stage, then prints the mean milliseconds per
    step of each phase() label and of the whole step (wall clock). On CUDA the table also shows the GPU's time per
    phase, so a reader sees whether the GPU waits on the host."""

    def __init__(self, enabled: bool, stage: str, start: int, total: int, n: int = 10):
        self.enabled, self.stage = enabled, stage
        self.first = min(start + 1, total - 1)                 # step `start` warms up (allocations, caches)
        self.last = min(self.first + n, total) - 1
        self.prof, self.t0 = None, 0.0

    def step_begins(self, step: int):
        if self.enabled and step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if torch.cuda.is_available() else [])
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
        rows = [(e.key[len("phase/"):], e.cpu_time_total / 1000 / n, getattr(e, "device_time_total", 0) / 1000 / n)
                for e in self.prof.key_averages() if e.key.startswith("phase/")]
        print(f"{self.stage} profile, steps {self.first}-{self.last} (ms per step; host time includes the host's "
              f"waits on the GPU):")
        print("| phase | host ms | GPU ms |\n|---|---|---|")
        for name, host, dev in sorted(rows, key=lambda r: -r[1]):
            print(f"| {name} | {host:.1f} | {dev:.1f} |")
        print(f"| whole step (wall) | {wall / n:.1f} | |", flush=True)
        self.prof = None


# ----------------------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun). Every process builds the same global batch from the same per-step seed and takes its
# share; gradients are averaged over the processes before the optimizer step, so the processes keep identical
# weights. This is what DistributedDataParallel does, written out: our model is driven through several methods
# (generate, token_logprobs, shared_prefix_logprobs), not one forward() that DDP could wrap. Without torchrun every
# helper here is the identity.


def init_distributed(args):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (NCCL), or per CPU share (gloo)."""
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return
    for name, n in (("--batch_size", args.batch_size), ("--rl_batch", args.rl_batch)):
        if n % args.world_size:
            fail(name, n, f"a multiple of the {args.world_size} processes (each takes an equal share)")
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


def my_share_of_items(flags: list, args, blocks: int) -> list:
    """Per-item flags of a global batch laid out as `blocks` equal blocks ([queries, positives, ...]) -> the flags
    of this process's items, laid out the same way."""
    n = len(flags) // blocks
    return [f for k in range(blocks) for f in my_share(flags[k * n:(k + 1) * n], args)]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every process the gradient of the summed losses w.r.t. its own rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                                  # every process's loss depends on every row
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather(x: torch.Tensor, args) -> torch.Tensor:
    return x if world_of(args) == 1 else _GatherWithGrad.apply(x)


def average_gradients(model, args):
    """Average every trainable parameter's gradient over the processes, in one flat all_reduce."""
    if world_of(args) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]   # a share without images
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_of(args)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g


def collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL has no CPU collectives, gloo takes CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_process(flag: torch.Tensor, args, read: bool = True):
    """A 0-d bool flag, true if it is true on any process (one all_reduce under torchrun). read: as a Python bool
    (a host synchronisation), else as a tensor on the flag's device."""
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


def last_good(folder: Path) -> str:
    """What a stop leaves behind, for the error message."""
    try:
        return f"the last checkpoint in {folder} (step {elva.read_manifest(folder)['step']}) is kept"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint of this stage was written to {folder}"


def optimizer_step(opt: torch.optim.Optimizer, model, loss: torch.Tensor, step: int, stage: str,
                   folder: Path, args=None) -> torch.Tensor:
    """Check the loss and the gradient are finite, backward, average the gradients over processes (torchrun), clip
    the gradient norm to 1, step. A non-finite loss or gradient stops the run before the update is applied (and so
    before anything is saved). -> pre-clip grad norm.

    With a fused AdamW (on CUDA) the check costs no host synchronisation: the optimizer is told on the device
    (found_inf, the mechanism of torch's GradScaler) to skip an update whose loss or gradient is not finite, and
    the host reads the verdicts at the next log step or checkpoint (check_updates), where the run stops."""
    fused = opt.defaults.get("fused")
    if not fused and any_process(~torch.isfinite(loss.detach()), args):   # every process stops, or none
        what = f"the loss is {loss.item()}" if not torch.isfinite(loss) else "another process's loss is not finite"
        raise FloatingPointError(f"{stage} step {step}: {what}; stopping before applying it; {last_good(folder)}")
    opt.zero_grad(set_to_none=True)
    with phase("backward"):
        loss.backward()
        average_gradients(model, args)
    with phase("optimizer"):
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if fused:   # the check on the device: found_inf = 1 skips the update; check_updates reads it later
            bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))
            opt.found_inf = any_process(bad, args, read=False).float()   # the same verdict on every process
            opt.step()
            opt.pending = getattr(opt, "pending", []) + [(step, opt.found_inf, loss.detach(), gnorm.detach())]
            opt.found_inf = None
        elif not torch.isfinite(gnorm):
            raise FloatingPointError(f"{stage} step {step}: the gradient norm is {gnorm.item()}; stopping before "
                                     f"applying it; {last_good(folder)}")
        else:
            opt.step()
    return gnorm


def check_updates(opt: torch.optim.Optimizer, stage: str, folder: Path):
    """Read the verdicts of the updates a fused optimizer checked on the device (optimizer_step), in one
    synchronisation: stop at the first step whose loss or gradient was not finite (its update was not applied)."""
    pending, opt.pending = getattr(opt, "pending", []), []
    if not pending:
        return
    values = torch.stack([torch.stack([f.float(), l.float(), g.float()]) for _, f, l, g in pending]).tolist()
    for (step, _, _, _), (skipped, loss, gnorm) in zip(pending, values):
        if skipped:
            what = (f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
                    if not math.isfinite(gnorm) else "another process's loss was not finite")
            raise FloatingPointError(f"{stage} step {step}: {what}; its update was not applied; stopping; "
                                     f"{last_good(folder)}")


def save(folder: Path, model, tok, meta: dict, opt, step: int, stage: str, args=None):
    """A checkpoint of the stage (weights + optimizer state, written as a unit) -- never of non-finite weights."""
    check_updates(opt, stage, folder)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"{stage} step {step}: the weights became non-finite ({bad[0]}"
                                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saving them; "
                                 f"{last_good(folder)}")
    if rank_of(args) == 0:   # one writer: every process holds the same weights
        elva.save_checkpoint(folder, model, tok, {**meta, "step": step}, optimizer=opt)
    barrier(args)


def resume_point(args, folder: Path, model, opt, stage: str, device) -> int:
    """With --resume and a checkpoint in `folder`: load its weights and optimizer state (hashes verified) into model
    and opt. -> the first step still to run (0 when starting afresh)."""
    if not (args.resume and (folder / "config.json").exists()):
        return 0
    saved, _, meta = elva.load_checkpoint(folder, device)
    model.load_state_dict(saved.state_dict())
    if not elva.load_optimizer(folder, opt, model, meta):
        print(f"{stage}: warning: {folder} holds no optimizer state; resuming with a fresh AdamW")
    print(f"{stage}: resumed from {folder} at step {meta['step'] + 1} (weights, optimizer state and tokenizer "
          f"verified against config.json)")
    return meta["step"] + 1

class StepStream(torch.utils.data.IterableDataset):
    """The inputs of steps start..stop-1, one per item, made by make(step). With n DataLoader workers, worker w makes
    steps start + w, start + w + n, ...; the DataLoader hands them back round-robin, so in step order."""

    def __init__(self, make, start: int, stop: int):
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.make(step)


def step_inputs(args, make, start: int, stop: int, device):
    """Iterate over the steps' inputs: made in DataLoader workers ahead of the step (--workers), in pinned memory
    beside a GPU, so that rendering and tokenising overlap the device's work; made in place with 0 workers."""
    workers = elva.default_workers(device, args.workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # workers are forked after the tokenizer is made
    return iter(torch.utils.data.DataLoader(StepStream(make, start, stop), batch_size=None, num_workers=workers,
                                            pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None))

def serializable(args) -> dict:
    """The run's arguments as JSON-ready values (a dataclass such as reward.RewardConfig as its fields)."""
    return {k: (v.__dict__ if hasattr(v, "__dataclass_fields__") else v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3's log line


def rollout_diagnostics(args, ro, R, parts, A_seq, info, policy, e_ref) -> dict:
    """What one stage-3 log line says about the step's signal (ro: train.Rollout).
    `tied_groups`: groups whose G rewards all tie (no gradient). `corr_len` / `corr_exact`: the mean, over groups, of
    the correlation between a rollout's reward and its summaries' mean length / whether its query summary is exactly
    the reference -- what the reward pays for. `pg` / `kl_term`: the policy-gradient part of the loss and beta * KL.
    `adv_query`: the share of the batch's |advantage| mass (over sampled tokens) on query summaries rather than
    candidate summaries. `drift`: the mean cosine distance between the policy's and the stage-2 model's (e_ref)
    embeddings of the same sampled words -- how far the map from words to embeddings has moved, which the policy
    gradient does not see. `cos_mean` / `cos_std` / `cos_pos`: the rollouts' cosines, all and the positive's.
    `scale_only_groups`: groups whose rollouts rank the candidates in the same order but whose rewards differ --
    advantage that is pure score scale (at fixed ranks R_Rank is linear in the cosines)."""
    B, G, K = ro.shape
    R = R.float().cpu()
    lens = torch.tensor([len(s) for s in ro.summaries], dtype=torch.float32).view(B, G, K)
    exact = torch.tensor([[float(policy.enc.decode(ro.summaries[(b * G + g) * K]) == q.item.summary)
                           for g in range(G)] for b, q in enumerate(ro.queries)])                    # (B, G)

    def group_corr(x, y):   # mean over groups of Pearson's r; a group where either side is constant counts 0
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        den = (x.norm(dim=1) * y.norm(dim=1))
        return torch.where(den > 1e-12, (x * y).sum(1) / den.clamp(min=1e-12), torch.zeros_like(den)).mean().item()

    tok_adv = A_seq.abs().cpu()[:, None] * ro.sampled.cpu().float()                                 # (S, T)
    per_item = tok_adv.sum(1).view(B, G, K)
    # the scale channel: R_Rank is linear in the cosines at fixed ranks, so rewards can differ with the order unchanged
    s = ro.scores.float().cpu()                                                                     # (B, G, C)
    order = s.argsort(-1, descending=True)                                                          # (B, G, C)
    same_order = (order == order[:, :1]).all(-1).all(-1)                                            # (B,)
    differ = (R.max(1).values - R.min(1).values) >= 1e-6                                            # (B,)
    return {"reward_mean": R.mean().item(), "reward_std": R.std().item(),
           "R_margin": parts["margin"].float().mean().item(), "R_rank": parts["rank"].float().mean().item(),
           "top1": (parts["pos_rank"] == 1).float().mean().item(),
           "tied_groups": ((R.max(1).values - R.min(1).values) < 1e-6).float().mean().item(),
           "kl": info["kl"].item(), "clip_low": info["clip_low"].item(), "clip_high": info["clip_high"].item(),
           "summary_len": lens.mean().item(), "query_exact": exact.mean().item(),
           "corr_len": group_corr(R.float(), lens.mean(2)), "corr_exact": group_corr(R.float(), exact),
           "adv_query": (per_item[:, :, 0].sum() / per_item.sum().clamp(min=1e-12)).item(),
           "pg": info["pg"].item(), "kl_term": args.beta * info["kl"].item(),
           "drift": (1 - (ro.e.reshape(e_ref.shape) * e_ref).sum(-1)).mean().item(),
           "cos_mean": s.mean().item(), "cos_std": s.std().item(), "cos_pos": s[..., 0].mean().item(),
           "scale_only_groups": (same_order & differ).float().mean().item()}


def global_tokens(mask: torch.Tensor, args, norm: str = "token") -> float | None:
    """Under torchrun: the sampled tokens (norm "sequence": the summaries with a sampled token) of the whole batch /
    the processes, so that grpo_loss's mean averaged over the processes is the mean over the whole batch. None (the
    local count) otherwise."""
    if world_of(args) == 1:
        return None
    n = (mask.sum() if norm == "token" else mask.any(1).sum()).float()
    dist.all_reduce(n)
    return float(n) / world_of(args)
