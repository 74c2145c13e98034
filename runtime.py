"""
Run machinery a reader of the paper may skip: what turns train.py's loops into a run that can be
trusted, resumed and spread over processes. Nothing here is ELVA. Parser: argparse with one-line
errors (`number`: range checks as `type=`). Run: threads, the device, the run folder (held by one
process), the tokenizer, each step's batch made ahead, torchrun's shares and gathers (the identity
on one process). Stage: --resume, the log, --profile, checkpoints, the finiteness stop.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import data
from retriever import (atomic_write, file_sha, load_tokenizer, read_checkpoint, read_log,
                       save_checkpoint, train_tokenizer)

STAGE_ORDER = ("describe", "text", "contrastive", "elva")   # stages 0-3
# What does not shape a stage's steps: where it runs, what it prints, what it is named.
NOT_SHAPING = {"resume", "overwrite", "device", "threads", "workers", "compile", "log_every",
               "ckpt_every", "no_eval", "profile", "out", "stages", "init", "rank", "world_size",
               "eval_queries", "mrbench_per_task", "eval_tasks", "elva_name", "probe_every"}
COUNTS = ("masked_false_neg",)   # log fields summed over processes (the others are averaged)
# all_gather is deprecated in torch 2.13 for a private successor; it is public from 2.4 to 2.13
warnings.filterwarnings("ignore", ".*all_gather is deprecated", FutureWarning)


# ----------------------------------------------------------------------------------------
# Flags: one line naming the flag, the value and what was expected, before any work


def fail(flag: str, value, expected: str):
    raise SystemExit(f"{flag} {value!r}: expected {expected}")


def number(lo=None, hi=None, kind=float, above=False):
    """An argparse `type=`: a finite `kind` in [lo, hi] (above: > lo)."""
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            v = None
        ok = v is not None and math.isfinite(v) and (lo is None or (v > lo if above else v >= lo))
        if not (ok and (hi is None or v <= hi)):
            bounds = [f"> {lo}" if above else f">= {lo}"] * (lo is not None) + [f"<= {hi}"] * (
                hi is not None)
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text}: expected {what} {' and '.join(bounds)}")
        return v
    return check


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`--steps 0: expected an integer >= 1`)."""

    def error(self, message):
        raise SystemExit(message.replace("argument ", "", 1).replace(": ", " ", 1)
                         if message.startswith("argument --") else f"error: {message}")

    def add_run_flags(self):
        add = self.add_argument_group("run machinery (runtime.py)").add_argument
        add("--resume", action="store_true", help="continue each stage from its checkpoint")
        add("--overwrite", action="store_true", help="start the run's stages afresh in --out")
        add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
        add("--threads", type=number(1, kind=int), default=None, help="CPU threads")
        add("--workers", type=number(0, kind=int), default=None, help="batch-making processes")
        add("--compile", action="store_true", help="torch.compile every transformer block (GPU)")
        add("--log_every", type=number(1, kind=int), default=None, help="steps between lines")
        add("--ckpt_every", type=number(1, kind=int), default=250, help="steps between saves")
        add("--no_eval", action="store_true", help="skip the final evaluation")
        add("--profile", action="store_true", help="torch.profiler's table of steps 1-10")

    def defaults(self) -> dict:
        return {a.dest: a.default for a in self._actions if a.dest != "help"}

    def stage_flags(self) -> dict:
        """Each stage's own flags, which --resume compares: all but those of another stage's
        groups ("stage 0" ... in a group's title); stages 0-1 also have stage 2's, but --steps."""
        groups = {s: {a.dest for g in self._action_groups if f"stage {i}" in (g.title or "")
                      for a in g._group_actions} for i, s in enumerate(STAGE_ORDER)}
        own = {s: set(self.defaults()) - set().union(*(g for t, g in groups.items() if t != s))
               for s in groups}
        for s in ("describe", "text"):
            own[s] |= groups["contrastive"] - {"steps", "text_every"}
        return own


def check_device(name: str, flag: str = "--device"):
    if name not in ("auto", "cpu", "cuda", "mps") and not name.startswith("cuda:"):
        fail(flag, name, "auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(flag, name, "a device this machine has: torch sees no CUDA GPU (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail(flag, name, "a device this machine has: MPS is not available here")


def one_line_errors(main, *argv):
    """A command line's main: a bad input (data.BadInput, SystemExit) is one line on stderr from
    the first process and exit code 1 on every process; a bug keeps its traceback."""
    try:
        return main(*argv)
    except (data.BadInput, SystemExit) as e:
        message = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if isinstance(message, int) or message is None:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr)
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------------------
# Threads and the device


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may use divided by the processes
    torchrun started on this machine: two jobs on two cores ran 12x slower at two threads each."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env and not (env.isdigit() and int(env) >= 1):
        fail("OMP_NUM_THREADS", env, "a whole number >= 1 (or unset)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(env) if env else max(1, cores() // max(1, local))


def set_threads(threads: int | None, rank: int = 0, world: int = 1) -> int:
    """--threads, else default_threads(); printed, with a warning on a busy machine."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    why = ("--threads" if threads else "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS")
           else "the cores this process may use / the processes on this machine")
    print(f"threads: {n} (from {why})" + (f" | process {rank} of {world}" if world > 1 else ""))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if n > 1 and (n > cores() or load + n > cores() + 0.5):
        print(f"warning: {n} threads on {cores()} cores with a load of {load:.1f}: threads that "
              f"share a core run many times slower; --threads 1 (or fewer jobs) may be faster")
    return n


def resolve_device(name: str):
    """cuda, else mps, else cpu; bf16 autocast on CUDA, fp32 elsewhere. Printed."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    dev = torch.device(name)
    print(f"device: {dev} | dtype: {'bf16 autocast' if dev.type == 'cuda' else 'fp32'} | torch "
          f"{torch.__version__}")
    bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)   # makes a context
    return dev, bf16 if dev.type == "cuda" else nullcontext


# ----------------------------------------------------------------------------------------
# The run: one per process


class Run:
    """torchrun, threads, the device, the run folder (held by this process), the seed."""

    def __init__(self, args, shaping: tuple[str, ...], parser: Parser):
        self.args, self.t0, self.minutes = args, time.time(), {}
        self.own, self.defaults = parser.stage_flags(), parser.defaults()
        self.world = args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = args.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            self.init_distributed()
        self.threads = set_threads(args.threads, self.rank, self.world)
        self.device, self.autocast = resolve_device(args.device)
        if self.rank == 0:
            self.hold_folder(Path(args.out))
            self.check_folder(shaping)
        self.barrier()
        torch.manual_seed(args.seed)
        shown = ("preset", "out", "seed", "stages", "steps", "rl_steps", "rl_lr", "beta", "mbeir")
        print("args:", " ".join(f"--{k} {','.join(v) if isinstance(v, list) else v}"
                                for k, v in vars(args).items() if k in shown and v is not None))

    def init_distributed(self):
        """One process per GPU (NCCL) or per CPU share (gloo); only the first one prints."""
        for name in ("batch_size", "rl_batch"):
            if getattr(self.args, name) % self.world:
                fail(f"--{name}", getattr(self.args, name), f"a multiple of the {self.world} "
                     "processes (each takes an equal share)")
        if self.rank > 0:
            sys.stdout = open(os.devnull, "w")
        nccl = torch.cuda.is_available() and not self.args.device.startswith("cpu")
        dist.init_process_group("nccl" if nccl else "gloo")
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"

    def barrier(self):
        dist.barrier() if self.world > 1 else None

    def hold_folder(self, out: Path):
        """A lock with this process's pid: refused while another live run holds the folder."""
        lock, me = out / ".lock", str(os.getpid())
        try:
            out.mkdir(parents=True, exist_ok=True)
            pid = lock.read_text().strip() if lock.exists() else me
            if pid != me:
                if pid.isdigit() and alive(int(pid)):   # a live process holds the folder
                    fail("--out", str(out), f"a folder no other run is using (process {pid} holds "
                                            f"it; wait for it, or choose another --out)")
                print(f"{out}: taking over the lock of process {pid!r}, which is gone")
            lock.write_text(me)
        except OSError as e:
            fail("--out", str(out), f"a folder this process can write ({e.strerror})")
        atexit.register(lambda: lock.exists() and lock.read_text() == me and lock.unlink())

    def check_folder(self, shaping: tuple[str, ...]):
        """One run a folder (run.json); --overwrite starts its stages afresh, and says so."""
        args, out = self.args, Path(self.args.out)
        if args.overwrite and args.resume:
            fail("--overwrite", True, "without --resume (--resume continues a run, --overwrite "
                                      "starts it afresh)")
        if args.overwrite:
            first = next(s for s in STAGE_ORDER if s in args.stages)
            names = [args.elva_name if s == "elva" else s for s in STAGE_ORDER]
            stale = [out / n for n in names[STAGE_ORDER.index(first):]] + list(out.glob("eval*"))
            stale += [out / "run.json", out / "tokenizer.json"] * ("contrastive" in args.stages)
            gone = [p for p in stale if p.exists()]
            for p in gone:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if gone:
                print(f"--overwrite: starting afresh from the {first} stage; removed "
                      f"{', '.join(p.name for p in gone)} from {out}")
        if "contrastive" not in args.stages:
            return
        now, path = {k: getattr(args, k) for k in shaping}, out / "run.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        for k, v in now.items():
            if k in old and old[k] != v:
                fail(f"--{k}", v, f"{old[k]!r}: the folder {out} holds a run made with it; use "
                                  f"another --out, the same --{k}, or --overwrite")
        atomic_write(path, lambda p: p.write_text(json.dumps(now, indent=2)))

    def tokenizer(self, source):
        """The run's BPE tokenizer: trained once on the source's text, kept in the run folder."""
        path = Path(self.args.out) / "tokenizer.json"
        if self.rank == 0 and not path.exists():
            tok = train_tokenizer(source.texts(), self.args.vocab_size)
            atomic_write(path, lambda p: tok.save(str(p)))
        self.barrier()
        tok = load_tokenizer(path)
        print(f"{source.describe} | tokenizer: {tok.get_vocab_size()} tokens "
              f"({time.time() - self.t0:.1f}s)")
        return tok

    def batches(self, make, share, encode, start: int, stop: int):
        """encode(share(make(step))) for steps start..stop-1: the step's global batch, this
        process's share, its tensors -- made ahead in DataLoader workers beside a GPU."""
        workers = self.args.workers
        if workers is None:   # none on a CPU: its cores do the model's work
            workers = 0 if self.device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return iter(torch.utils.data.DataLoader(
            Steps(make, share, encode, start, stop), batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None))

    # -- torchrun: each the identity on one process -------------------------------------------
    def share(self, xs):
        """This process's contiguous share of a global batch."""
        n = len(xs) // self.world
        return xs[self.rank * n:(self.rank + 1) * n]

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every process's rows, autograd-aware -> (all rows, where this process's rows start)."""
        if self.world == 1:
            return x, 0
        from torch.distributed.nn.functional import all_gather
        rows = all_gather(x.contiguous(), group=dist.group.WORLD)
        return torch.cat(rows), self.rank * x.shape[0]

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the processes (an integer or bool x as float)."""
        x = x.detach()
        x = (x if x.is_floating_point() else x.float()).to(
            torch.device("cuda", torch.cuda.current_device())
            if self.world > 1 and dist.get_backend() == "nccl" else torch.device("cpu"))
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def tokens(self, mask: torch.Tensor, norm: str = "token") -> float | None:
        """GRPO's mean's denominator under torchrun: the sampled tokens (norm "sequence": the
        summaries with one) of the whole batch / the processes. None on one process."""
        if self.world == 1:
            return None
        return float(self.total(mask.sum() if norm == "token" else mask.any(1).sum())) / self.world

    def average_gradients(self, model):
        """Each trainable parameter's gradient averaged over the processes; a parameter that no
        process gave a gradient keeps none (AdamW then leaves it alone, as on one process)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        has = self.total(torch.tensor([p.grad is not None for p in params]))
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for p, g in zip(live, torch._utils._unflatten_dense_tensors(flat / self.world, grads)):
                p.grad = g

    def stage(self, name: str, steps: int, retriever, opt, meta: dict, init=None,
              show: tuple[str, ...] | None = None):
        """The stage in --out/name: checked, resumed (--resume), or None if already complete."""
        folder, kind = Path(self.args.out) / name, "elva" if name == self.args.elva_name else name
        meta = {**meta, "stage": kind, "args": dict(vars(self.args)), "defaults": self.defaults}
        if init is not None:
            meta["init_sha256"] = file_sha(Path(init) / "model.safetensors")
        start = 0
        if (folder / "model.safetensors").exists() or (folder / "config.json").exists():
            start = resume(self, kind, folder, retriever.model, opt, init)
        if start >= steps:
            print(f"{name}: already complete ({steps} steps) in {folder}")
            return None
        return Stage(self, name, steps, retriever, opt, meta, start, show)

    def finish(self):
        """The run's time, each stage's, and the world's end."""
        each = " | ".join(f"{k} {v:.1f}" for k, v in self.minutes.items())
        print(f"total time {(time.time() - self.t0) / 60:.1f} min" + (f" ({each})" if each else ""))
        if self.args.preset == "smoke":
            print("(smoke: its numbers check the plumbing, not the method; --preset cpu or gpu)")
        if self.world > 1:
            self.barrier()
            dist.destroy_process_group()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)          # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:      # it does, another user's
        pass
    return True


class Steps(torch.utils.data.IterableDataset):
    """Steps start..stop-1; worker w of n makes steps start + w, + n, ...: in step order."""

    def __init__(self, make, share, encode, start: int, stop: int):
        self.make, self.share, self.encode, self.start, self.stop = make, share, encode, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.encode(self.share(self.make(step)))


# ----------------------------------------------------------------------------------------
# A stage: its folder, log and checkpoints


class Stage:
    """A stage of the run: where it starts, its log, --profile, its checkpoints."""

    def __init__(self, run: Run, name: str, steps: int, retriever, opt, meta: dict, start: int,
                 show):
        self.run, self.args, self.name, self.steps = run, run.args, name, steps
        self.retriever, self.opt, self.meta, self.start = retriever, opt, meta, start
        self.folder, self.show, self.t0 = Path(run.args.out) / name, show, time.time()
        self.printed, self.prof = self.t0, None
        if run.rank == 0:
            path = self.folder / "log.jsonl"
            self.folder.mkdir(parents=True, exist_ok=True)
            kept = [line for line, rec in read_log(path) if rec["step"] < start] \
                if start and path.exists() else []
            atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
            self.log_file = open(path, "a")   # a resumed log keeps the steps before its start

    def log(self, step: int, rec: dict):
        """The step's record; a line every log_every steps, at the last and at least every 10 s.
        Counts are summed over processes, the rest averaged."""
        rec = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
        if self.run.world > 1:
            keys = [k for k, v in rec.items() if isinstance(v, (int, float))]
            v = self.run.total(torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64))
            rec.update({k: int(x) if k in COUNTS else x / self.run.world
                        for k, x in zip(keys, v.tolist())})
        self.profile(step)
        if self.run.rank > 0:
            return
        now = time.time()
        ms = 1000 * (now - self.t0) / max(1, step + 1 - self.start)
        rec = {"stage": self.name, "step": step, "ms_per_step": round(ms, 1), **rec}
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        if step % self.args.log_every == 0 or step == self.steps - 1 or now - self.printed >= 10:
            self.printed, eta = now, (self.steps - step - 1) * ms / 60000
            shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in list(rec.items())[3:]
                               if self.show is None or k in self.show)
            print(f"{self.name} {step:05d}/{self.steps} | {shown} | {ms:.0f} ms/step | eta "
                  f"{eta:.1f} min", flush=True)

    def profile(self, step: int):
        """--profile: torch.profiler's table of steps start+1..start+10 (train.py's phases)."""
        first = min(self.start + 1, self.steps - 1)
        if self.args.profile and step + 1 == first:
            self.prof = torch.profiler.profile()
            self.prof.start()
        elif self.prof is not None and (step == first + 9 or step == self.steps - 1):
            self.prof.stop()
            print(f"{self.name} profile, steps {first}-{step}:")
            print(self.prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
            self.prof = None

    def stop_unless_finite(self, step: int, loss: torch.Tensor, gnorm: torch.Tensor):
        """Stop (every process) before a non-finite loss or gradient is applied."""
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm.detach()))
        if self.run.total(bad.reshape(1))[0] > 0:
            what = (f"the loss is {loss.item()}" if not torch.isfinite(loss) else
                    f"the gradient norm is {gnorm.item()}" if not torch.isfinite(gnorm) else
                    "another process's loss or gradient is not finite")
            raise FloatingPointError(f"{self.name} step {step}: {what}; stopping before applying "
                                     f"it; {self.last_good()}")

    def last_good(self) -> str:
        try:
            return f"the last checkpoint in {self.folder} (step " \
                   f"{read_checkpoint(self.folder)[3]['step']}) is kept"
        except (OSError, data.BadInput, KeyError):
            return f"no checkpoint of this stage was written to {self.folder}"

    def save_if_due(self, step: int):
        """A checkpoint every ckpt_every steps and at the last -- never of non-finite weights."""
        if (step + 1) % self.args.ckpt_every and step != self.steps - 1:
            return
        model = self.retriever.model
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f"{self.name} step {step}: the weights became non-finite "
                                     f"({bad[0]} and {len(bad) - 1} more); not saving them; "
                                     f"{self.last_good()}")
        if self.run.rank == 0:   # one writer: every process holds the same weights
            save_checkpoint(self.folder, model, self.retriever.tok, {**self.meta, "step": step},
                            self.opt)
        self.run.barrier()
        if step == self.steps - 1:
            self.run.minutes[self.name] = (time.time() - self.t0) / 60
            print(f"{self.name}: saved {self.folder} ({self.run.minutes[self.name]:.1f} min)")


def resume(run: Run, kind: str, folder: Path, model, opt, init) -> int:
    """A stage's checkpoint: refused without --resume; with it, checked against the stage's own
    flags (recorded and current; one side's missing flag at its default) and its input stage,
    then restored -> the first step to run."""
    args = run.args
    if not (folder / "model.safetensors").exists():
        fail("--resume" if args.resume else "--out", str(folder), "a model.safetensors (its "
             "checkpoint's older layout loads for eval.py and --init; --overwrite starts afresh)")
    state, _, _, meta = read_checkpoint(folder)
    if not args.resume:
        raise SystemExit(f"{folder} holds a checkpoint of the {kind} stage (step {meta['step']}):"
                         f" --resume continues it, --overwrite starts it and the later stages "
                         f"afresh, or choose another --out")
    own, recorded = run.own.get(kind, set(vars(args))), meta.get("args", {})
    for k in sorted((set(recorded) | set(vars(args))) - NOT_SHAPING):
        if k not in own and k not in recorded.keys() - vars(args).keys():
            continue   # another stage's flag (one only the recording program has: compared)
        then = recorded.get(k, run.defaults.get(k))
        now = json.loads(json.dumps(getattr(args, k, meta.get("defaults", {}).get(k))))
        if now != then:
            fail(f"--{k}", getattr(args, k, None), f"{then!r}, the value the {kind} checkpoint "
                 f"in {folder} was made with (--resume continues a stage with its own flags; "
                 f"--overwrite starts it and the later stages afresh)")
    if init is not None and meta.get("init_sha256") not in (
            None, file_sha(Path(init) / "model.safetensors")):
        fail(f"the {kind} stage's input", str(init), f"the checkpoint {folder} started from (it "
             f"changed since: the {kind} stage is not complete; --overwrite starts it afresh)")
    opt_file = folder / meta.get("optimizer", "-")
    if not opt_file.is_file():
        fail("--resume", str(folder), f"a checkpoint with its optimizer state ({opt_file.name} is "
             f"missing; --overwrite starts the stage afresh)")
    model.load_state_dict(state)
    opt.load_state_dict(torch.load(opt_file, map_location="cpu", weights_only=True))
    print(f"{folder.name}: resumed from {folder} at step {meta['step'] + 1}")
    return meta["step"] + 1
