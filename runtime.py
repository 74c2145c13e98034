"""
Run machinery a reader of the paper may skip: what turns train.py's loops into a run that can be
trusted, resumed and spread over processes. Nothing here is ELVA.

- Parser: argparse with one-line errors and range checks as `type=`; the preset's values filled in.
- Run: threads and the device, the run folder (one run, held by one process), the tokenizer,
  each step's batch made ahead, torchrun's shares and gathers -- each the identity on one process,
  as its comment says where train.py calls it -- and the final evaluation.
- Stage: one stage's folder: --resume's checks and restore, the log, --profile, the checkpoints,
  the finiteness stop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import data
from retriever import atomic_write, load_tokenizer, read_checkpoint, save_checkpoint, train_tokenizer
from reward import ordered_gamma_limit


# --------------------------------------------------------------------------------------------------
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
            what = "an integer" if kind is int else "a finite number"
            bounds = ([f"> {lo}" if above else f">= {lo}"] if lo is not None else []) + (
                [f"<= {hi}"] if hi is not None else [])
            raise argparse.ArgumentTypeError(f"{text}: expected {what} {' and '.join(bounds)}")
        return v
    return check


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`--steps '0': expected an integer >= 1`), no usage
    block; parse() also fills the preset's values and checks what no single flag can."""

    def error(self, message):
        raise SystemExit(message.replace("argument ", "", 1).replace(": ", " ", 1)
                         if message.startswith("argument --") else f"error: {message}")

    def add_run_flags(self):
        add = self.add_argument_group("run machinery (runtime.py)").add_argument
        add("--resume", action="store_true", help="continue each stage from its checkpoint")
        add("--overwrite", action="store_true", help="start the run's stages afresh in --out")
        add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
        add("--threads", type=number(1, kind=int), default=None, help="CPU threads (default: "
            "the cores this process may use)")
        add("--workers", type=number(0, kind=int), default=None, help="DataLoader processes "
            "making the next batches (default: 0 on a CPU, up to 4 beside a GPU)")
        add("--compile", action="store_true", help="torch.compile every transformer block (GPU)")
        add("--log_every", type=number(1, kind=int), default=None, help="steps between lines")
        add("--ckpt_every", type=number(1, kind=int), default=250, help="steps between saves")
        add("--no_eval", action="store_true", help="skip the final evaluation")
        add("--profile", action="store_true", help="torch.profiler's table of steps 1-10")

    def defaults(self) -> dict:
        return {a.dest: a.default for a in self._actions if a.dest != "help"}

    def stage_flags(self) -> dict:
        """Each stage's own flags, which --resume compares: all but those of another stage's
        groups ("stage 1", "stage 2", "stage 3" in a group's title); stage 1 also trains with
        stage 2's batch, lr and loss, but not for its --steps."""
        groups = {s: {a.dest for g in self._action_groups if f"stage {i}" in (g.title or "")
                      for a in g._group_actions} for i, s in enumerate(STAGE_ORDER, 1)}
        every = set(self.defaults())
        own = {s: every - set().union(*(g for t, g in groups.items() if t != s)) for s in groups}
        own["text"] |= groups["contrastive"] - {"steps"}
        return own

    def parse(self, argv, presets: dict, common: dict, n_tasks: int):
        """The flags, the preset's values where a flag was not given, then the cross checks."""
        args = self.parse_args(argv)
        args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
        for k, v in {**common, **presets[args.preset]}.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        args.out = args.out or f"runs/{args.preset}"
        if args.world_seed is None:
            args.world_seed = args.seed
        args.stages = [s.strip() for s in (args.stages or ("contrastive,elva" if args.mbeir else
                                                            "text,contrastive,elva")).split(",")]
        args.train_tasks = [s.strip() for s in args.train_tasks.split(",") if s.strip()]
        check_device(args.device)
        check_together(args, n_tasks)
        return args


def check_together(args, n_tasks: int):
    """What no single flag's range says: the stages, the data's sizes, the reward's order."""
    if not args.stages or any(s not in ("text", "contrastive", "elva") for s in args.stages):
        fail("--stages", ",".join(args.stages), "a comma list of text, contrastive and/or elva")
    if "text" in args.stages and "contrastive" not in args.stages:
        fail("--stages", ",".join(args.stages), "text together with contrastive (stage 2 starts "
                                                "from stage 1)")
    if args.mbeir is not None:
        if not (Path(args.mbeir) / "query" / "train").is_dir():
            fail("--mbeir", args.mbeir, "an M-BEIR root holding query/train/ (and cand_pool/, "
                                        "instructions/)")
        if "text" in args.stages:
            fail("--stages", ",".join(args.stages), "contrastive and/or elva with --mbeir (the "
                 "text stage's NLI triplets are made from GrainWorld captions)")
    elif args.batch_size > args.n_train:
        fail("--batch_size", args.batch_size, f"at most the {args.n_train} training scenes "
                                              f"(--n_train) a batch is drawn from")
    elif args.n_hard + args.n_rand >= args.rl_pool_scenes:
        fail("--n_hard + --n_rand", args.n_hard + args.n_rand, f"fewer than the "
             f"{args.rl_pool_scenes} training scenes each task's mining pool starts from "
             f"(--rl_pool_scenes)")
    if args.n_hard + args.n_rand < 1:
        fail("--n_hard + --n_rand", args.n_hard + args.n_rand, ">= 1: a ranking needs a negative")
    if args.mbeir is None and args.rl_batch > n_tasks * args.rl_queries:
        fail("--rl_batch", args.rl_batch, f"<= the RL instances ({n_tasks} tasks x --rl_queries "
                                         f"{args.rl_queries} = {n_tasks * args.rl_queries})")
    C = 1 + args.n_hard + args.n_rand
    if args.gamma is not None and args.gamma >= ordered_gamma_limit(C):
        works = [c for c in range(2, C) if args.gamma < ordered_gamma_limit(c)]   # it falls with C
        fewer = f", or at most {works[-1]} candidates" if works else ""
        fail("--gamma", args.gamma, f"below {ordered_gamma_limit(C):.4f} at C = {C} candidates "
             f"(1 + --n_hard + --n_rand){fewer}: a larger gamma pays R_Rank more for the positive "
             f"ranked lower; 'auto' keeps the order")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        fail("--out", args.out, "a folder (this path is a file)")


def check_device(name: str, flag: str = "--device"):
    if name not in ("auto", "cpu", "cuda", "mps") and not name.startswith("cuda:"):
        fail(flag, name, "auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(flag, name, "a device this machine has: torch sees no CUDA GPU (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail(flag, name, "a device this machine has: MPS is not available here")


def one_line_errors(main, *argv):
    """A command line's main: an input that is not what was expected (data.BadInput, SystemExit)
    is one line on stderr, from the first process only, and exit code 1 on every process;
    anything else is a bug and keeps its traceback."""
    try:
        return main(*argv)
    except (data.BadInput, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if isinstance(code, int) or code is None:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(code, file=sys.stderr)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------------------------------
# Threads and the device


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may use divided by the processes
    torchrun started on this machine: two jobs on two cores ran 12x slower at two threads each."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            fail("OMP_NUM_THREADS", env, "a whole number >= 1 (or unset)")
        return int(env)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores() // max(1, local))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_threads(threads: int | None, rank: int = 0, world: int = 1) -> int:
    """--threads, else default_threads(); printed with its source, and a warning when they are
    more than the cores or the machine is already busy (threads on a busy core crawl)."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    why = ("--threads" if threads else "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS")
           else "the cores this process may use / the processes on this machine")
    where = f" | process {rank} of {world}" if world > 1 else ""
    print(f"threads: {n} (from {why}){where}")
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if n > 1 and (n > cores() or busy + n > cores() + 0.5):
        print(f"warning: {n} threads on {cores()} cores with a load of {busy:.1f}: threads that "
              f"share a core run many times slower; --threads 1 (or fewer jobs) may be faster")
    return n


def resolve_device(name: str):
    """cuda, else mps, else cpu; bf16 autocast on CUDA, fp32 elsewhere. Printed."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    dev = torch.device(name)
    autocast = cuda_autocast if dev.type == "cuda" else nullcontext
    print(f"device: {dev} | dtype: {'bf16 autocast' if dev.type == 'cuda' else 'fp32'} | torch "
          f"{torch.__version__}")
    return dev, autocast


def cuda_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# The run: one per process


STAGE_ORDER = ("text", "contrastive", "elva")
# What does not shape a stage's steps: where it runs, what it prints, what it is named.
NOT_SHAPING = {"resume", "overwrite", "device", "threads", "workers", "compile", "log_every",
               "ckpt_every", "no_eval", "profile", "out", "stages", "init", "rank", "world_size",
               "eval_queries", "mrbench_per_task", "eval_tasks", "elva_name", "probe_every"}
COUNTS = ("masked_false_neg",)   # log fields summed over processes (the others are averaged)


class Run:
    """torchrun, threads, the device, the run folder (held by this process), the seed -- printed
    in the run's first lines."""

    def __init__(self, args, shaping: tuple[str, ...], parser: Parser):
        self.args, self.t0 = args, time.time()
        self.own, self.defaults = parser.stage_flags(), parser.defaults()
        self.minutes = {}                    # each stage's minutes, printed at the end
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = args.rank = int(os.environ.get("RANK", "0"))
        args.world_size = self.world
        if self.world > 1:
            self.init_distributed()
        self.threads = set_threads(args.threads, self.rank, self.world)
        self.device, self.autocast = resolve_device(args.device)
        if self.rank == 0:
            self.hold_folder(Path(args.out))
            self.check_folder(shaping)
        self.barrier()
        torch.manual_seed(args.seed)
        shown = ("preset", "out", "seed", "stages", "device", "steps", "rl_steps", "rl_lr", "beta",
                 "mbeir")
        print("args:", " ".join(f"--{k} {','.join(v) if isinstance(v, list) else v}"
                                for k, v in vars(args).items() if k in shown and v is not None),
              "(all: in each stage's model.safetensors)")

    @classmethod
    def local(cls, args, device: str = "cpu") -> "Run":
        """One process and no run folder: what train.py's steps read of a Run, for tests and
        interactive use (args.out still names where a Stage writes)."""
        run = cls.__new__(cls)
        run.args, run.t0, run.world, run.rank = args, time.time(), 1, 0
        run.threads, run.device = torch.get_num_threads(), torch.device(device)
        run.autocast = cuda_autocast if run.device.type == "cuda" else nullcontext
        run.own, run.defaults, run.minutes = {}, {}, {}
        args.rank, args.world_size = 0, 1
        return run

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
        if self.world > 1:
            dist.barrier()

    # -- the run folder: one run, held by one process ----------------------------------------
    def hold_folder(self, out: Path):
        """A lock file with this process's pid: a second run into the folder is refused while
        the first lives; a lock left by a dead process is taken over, and the run says so."""
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = out / ".lock"
            if lock.exists():
                pid = int(lock.read_text().strip() or 0)
                if pid and pid != os.getpid() and _alive(pid):
                    fail("--out", str(out), f"a folder no other run is using (process {pid} holds "
                                            f"it; wait for it, or choose another --out)")
                print(f"{out}: taking over the lock of process {pid}, which is gone")
            lock.write_text(str(os.getpid()))
        except OSError as e:
            fail("--out", str(out), f"a folder this process can write ({e.strerror})")
        import atexit
        atexit.register(lambda: lock.exists() and lock.read_text() == str(os.getpid())
                        and lock.unlink())

    def check_folder(self, shaping: tuple[str, ...]):
        """A run folder is one run: one world, tokenizer and model shape (run.json); --overwrite
        starts the run's first stage and every later one afresh, and says what it removed."""
        args, out = self.args, Path(self.args.out)
        if args.overwrite and args.resume:
            fail("--overwrite", True, "without --resume (--resume continues a run, --overwrite "
                                      "starts it afresh)")
        if args.overwrite:
            first = next(s for s in STAGE_ORDER if s in args.stages)
            names = [args.elva_name if s == "elva" else s for s in STAGE_ORDER]
            stale = [out / n for n in names[STAGE_ORDER.index(first):]] + list(out.glob("eval*"))
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
        now = {k: getattr(args, k) for k in shaping}
        path = out / "run.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        for k, v in now.items():
            if k in old and old[k] != v:
                fail(f"--{k}", v, f"{old[k]!r}: the folder {out} holds a run made with it; use "
                                  f"another --out, the same --{k}, or --overwrite")
        atomic_write(path, lambda p: p.write_text(json.dumps(now, indent=2)))

    def tokenizer(self, source):
        """The run's BPE tokenizer: trained once on the source's text (by the first process)
        and kept in the run folder."""
        path = Path(self.args.out) / "tokenizer.json"
        if self.rank == 0 and not path.exists():
            tok = train_tokenizer(source.texts(), self.args.vocab_size)
            atomic_write(path, lambda p: tok.save(str(p)))
        self.barrier()
        tok = load_tokenizer(path)
        print(f"{source.describe} | tokenizer: {tok.get_vocab_size()} tokens "
              f"({time.time() - self.t0:.1f}s)")
        return tok

    # -- each step's batch, made ahead --------------------------------------------------------
    def batches(self, make, share, encode, start: int, stop: int):
        """encode(share(make(step))) for steps start..stop-1: the step's global batch from its
        seed, this process's share, its tensors -- in DataLoader workers ahead of the step beside
        a GPU (--workers), in place on a CPU."""
        workers = self.args.workers
        if workers is None:
            workers = 0 if self.device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        stream = _Steps(make, share, encode, start, stop)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                pin_memory=self.device.type == "cuda",
                                                prefetch_factor=2 if workers else None))

    # -- torchrun: each the identity on one process -------------------------------------------
    def share(self, xs):
        """This process's contiguous share of a global batch."""
        n = len(xs) // self.world
        return xs[self.rank * n:(self.rank + 1) * n]

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every process's rows (autograd-aware) -> (all rows, where this process's first row
        sits among them)."""
        if self.world == 1:
            return x, 0
        from torch.distributed.nn.functional import all_gather
        with warnings.catch_warnings():   # deprecated in torch 2.13 for a private successor
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(x.contiguous(), group=dist.group.WORLD)), self.rank * x.shape[0]

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """A count summed over the processes (a float tensor)."""
        x = x.detach()
        x = (x if x.is_floating_point() else x.float()).to(self.collective_device())
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def tokens(self, mask: torch.Tensor, norm: str = "token") -> float | None:
        """GRPO's mean's denominator under torchrun: the sampled tokens (norm "sequence": the
        summaries with one) of the whole batch / the processes. None on one process."""
        if self.world == 1:
            return None
        n = mask.sum() if norm == "token" else mask.any(1).sum()
        return float(self.total(n)) / self.world

    def average_gradients(self, model):
        """Each trainable parameter's gradient averaged over the processes; a parameter that no
        process gave a gradient keeps none (AdamW then leaves it alone, as on one process)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        has = self.total(torch.tensor([p.grad is not None for p in params]))
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(live, torch._utils._unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def collective_device(self) -> torch.device:
        if self.world > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- a stage, and the run's end -----------------------------------------------------------
    def stage(self, name: str, steps: int, retriever, opt, meta: dict, init=None,
              show: tuple[str, ...] | None = None):
        """The stage in --out/name: checked, resumed (--resume), or None if already complete."""
        return Stage.open(self, name, steps, retriever, opt, meta, init, show)

    def finish(self, eval_tasks: str | None = None):
        """eval.py on the run's stage-2 and stage-3 checkpoints, in its own process (eval.json;
        with --mbeir one M-BEIR evaluation per checkpoint), then the total time."""
        args, out, t_eval = self.args, Path(self.args.out), time.time()
        if not args.no_eval and self.rank == 0:
            ckpts = [c for c in ("contrastive", args.elva_name)
                     if (out / c / "model.safetensors").exists()]
            common = ["--device", str(self.device), "--threads", str(self.threads)]
            cmds = []
            if not args.mbeir:
                cmds = [["--out", str(out / "eval.json"), "--queries", str(args.eval_queries),
                         "--mrbench_per_task", str(args.mrbench_per_task)]
                        + [x for c in ckpts for x in ("--ckpt", str(out / c))]]
            elif eval_tasks is None:
                print(f"eval: skipped; {args.mbeir} has no test query file for the training "
                      f"tasks (give --eval_tasks)")
            else:
                cmds = [["--ckpt", str(out / c), "--mbeir", args.mbeir, "--tasks", eval_tasks,
                         "--out", str(out / f"eval_{c}.json")] for c in ckpts]
            for cmd in cmds:
                cmd = [sys.executable, str(Path(__file__).with_name("eval.py")), *cmd, *common]
                print("eval:", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
        if not args.no_eval and self.rank == 0:
            self.minutes["eval"] = (time.time() - t_eval) / 60
        each = " | ".join(f"{k} {v:.1f}" for k, v in self.minutes.items())
        print(f"total time {(time.time() - self.t0) / 60:.1f} min" + (f" ({each})" if each else ""))
        if args.preset == "smoke":
            print("(the smoke preset trains for seconds: its numbers check the plumbing, not the "
                  "method; --preset cpu or gpu for results)")
        if self.world > 1:
            self.barrier()
            dist.destroy_process_group()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Steps(torch.utils.data.IterableDataset):
    """Steps start..stop-1 as items; with n workers, worker w makes steps start + w, start + w + n,
    ..., which the DataLoader hands back round-robin: in step order."""

    def __init__(self, make, share, encode, start: int, stop: int):
        self.make, self.share, self.encode, self.start, self.stop = make, share, encode, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            yield self.encode(self.share(self.make(step)))


# --------------------------------------------------------------------------------------------------
# A stage: its folder, log and checkpoints


class Stage:
    """One stage of the run: where it starts (0, or after --resume's checkpoint), its log (a line
    every --log_every steps, a JSONL record every step), --profile, its checkpoints."""

    def __init__(self, run: Run, name: str, steps: int, retriever, opt, meta: dict, start: int,
                 show):
        self.run, self.args, self.name, self.steps = run, run.args, name, steps
        self.retriever, self.opt, self.meta, self.start = retriever, opt, meta, start
        self.folder, self.show, self.t0 = Path(run.args.out) / name, show, time.time()
        self.printed, self.prof = self.t0, None
        self.later = later_steps(run.args, "elva" if name == run.args.elva_name else name)
        if run.rank == 0:
            path = self.folder / "log.jsonl"
            self.folder.mkdir(parents=True, exist_ok=True)
            kept = [line for line, rec in read_log(path) if rec["step"] < start] \
                if start and path.exists() else []
            atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
            self.log_file = open(path, "a")

    @classmethod
    def open(cls, run: Run, name, steps, retriever, opt, meta, init, show):
        folder = Path(run.args.out) / name
        kind = "elva" if name == run.args.elva_name else name
        meta = {**meta, "stage": kind, "args": dict(vars(run.args)), "defaults": run.defaults}
        if init is not None:
            meta["init_sha256"] = file_sha(Path(init) / "model.safetensors")
        start = 0
        if (folder / "model.safetensors").exists() or (folder / "config.json").exists():
            start = resume(run, name, folder, retriever.model, opt, init)
        if start >= steps:
            print(f"{name}: already complete ({steps} steps) in {folder}")
            return None
        return cls(run, name, steps, retriever, opt, meta, start, show)

    def log(self, step: int, rec: dict):
        """The step's record (tensors read here); a line every log_every steps, at the last one
        and at least every 10 s. Counts are summed over processes, the rest averaged."""
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
            self.printed = now
            shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in list(rec.items())[3:]
                               if self.show is None or k in self.show)
            eta = (self.steps - step - 1) * ms / 60000
            later = f" | run eta ~{eta + self.later * ms / 60000:.0f} min + eval" if self.later else ""
            print(f"{self.name} {step:05d}/{self.steps} | {shown} | {ms:.0f} ms/step | eta "
                  f"{eta:.1f} min{later}", flush=True)

    def profile(self, step: int):
        """--profile: torch.profiler over steps start+1..start+10, then its table (by phase:
        the record_function labels of train.py)."""
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
        """Stop the run (on every process) before a non-finite loss or gradient is applied."""
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm.detach()))
        if self.run.total(bad.reshape(1))[0] > 0:
            what = (f"the loss is {loss.item()}" if not torch.isfinite(loss) else
                    f"the gradient norm is {gnorm.item()}" if not torch.isfinite(gnorm) else
                    "another process's loss or gradient is not finite")
            raise FloatingPointError(f"{self.name} step {step}: {what}; stopping before applying "
                                     f"it; {self.last_good()}")

    def last_good(self) -> str:
        try:
            return (f"the last checkpoint in {self.folder} (step "
                    f"{read_checkpoint(self.folder)[3]['step']}) is kept")
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


# A step's cost relative to a stage-2 step (cpu preset, one thread): a guide for the run's ETA.
STEP_COST = {"text": 0.9, "contrastive": 1.0, "elva": 1.4}


def later_steps(args, stage: str) -> float:
    """The steps of the run's stages after `stage`, in units of one `stage` step (STEP_COST)."""
    order = [s for s in STAGE_ORDER if s in args.stages]
    steps = {"text": args.text_steps, "contrastive": args.steps, "elva": args.rl_steps}
    if stage not in order:
        return 0.0
    return sum(steps[s] * STEP_COST[s] for s in order[order.index(stage) + 1:]) / STEP_COST[stage]


def file_sha(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resume(run: Run, name: str, folder: Path, model, opt, init) -> int:
    """A checkpoint in the stage's folder: refused without --resume; with it, checked against
    this run's flags -- the stage's own, recorded and current together, a flag one side lacks
    at that side's default -- and its input stage, then restored. -> the first step to run."""
    args = run.args
    if (folder / "config.json").exists() and not (folder / "model.safetensors").exists():
        fail("--resume" if args.resume else "--out", str(folder), "a checkpoint of this layout: "
             "it holds one from before model.safetensors, which loads for evaluation and --init "
             "but not for --resume (--overwrite starts the stage afresh)")
    state, _, _, meta = read_checkpoint(folder)
    if not args.resume:
        raise SystemExit(f"{folder} holds a checkpoint of the {name} stage (step {meta['step']}):"
                         f" --resume continues it, --overwrite starts it and the later stages "
                         f"afresh, or choose another --out")
    own = run.own.get("elva" if name == args.elva_name else name, set(vars(args)))
    recorded, defaults = meta.get("args", {}), meta.get("defaults", {})
    for k in sorted((set(recorded) | set(vars(args))) - NOT_SHAPING):
        if k not in own and k not in recorded.keys() - vars(args).keys():
            continue   # another stage's flag (a flag only the recording program has: compared)
        then = recorded.get(k, run.defaults.get(k))
        now = json.loads(json.dumps(getattr(args, k, defaults.get(k))))
        if now != then:
            fail(f"--{k}", getattr(args, k, None), f"{then!r}, the value the {name} checkpoint "
                 f"in {folder} was made with (--resume continues a stage with its own flags; "
                 f"--overwrite starts it and the later stages afresh)")
    if init is not None and meta.get("init_sha256") not in (
            None, file_sha(Path(init) / "model.safetensors")):
        fail(f"the {name} stage's input", str(init), f"the checkpoint {folder} started from (it "
             f"changed since: the {name} stage is not complete; --overwrite starts it afresh)")
    model.load_state_dict(state)
    opt_file = folder / meta.get("optimizer", "-")
    if not opt_file.is_file():
        fail("--resume", str(folder), f"a checkpoint with its optimizer state ({opt_file.name} is "
             f"missing; --overwrite starts the stage afresh)")
    opt.load_state_dict(torch.load(opt_file, map_location="cpu", weights_only=True))
    print(f"{name}: resumed from {folder} at step {meta['step'] + 1}")
    return meta["step"] + 1


def read_log(path: Path) -> list[tuple[str, dict]]:
    """A log.jsonl's (line, record) pairs; a last line cut short (a power loss) is dropped with a
    warning, a bad line elsewhere is named."""
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
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
    return [rec for _, rec in read_log(Path(folder) / "log.jsonl")]


def write_json(path, obj):
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2)))
