"""`python -m study COMMAND ...`: the study's commands (see study/__init__.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime import Parser, number, one_line_errors
from study import probes, tables, variants

HERE = Path(__file__).resolve().parent


def read_runs(path: Path = HERE / "runs.txt") -> list[tuple[str, str, list[str]]]:
    """study/runs.txt: one run a line -- name, seed, its flags; '#' starts a comment; a trailing
    backslash continues a line."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    runs = []
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if words:
            runs.append((words[0], words[1], words[2:]))
    return runs


def study_runs(argv):
    p = Parser(prog="python -m study runs",
               description="the study's stage-3 runs from one stage-2 model")
    p.add_argument("init", help="the stage-2 checkpoint every run starts from (e.g. "
                                "runs/cpu/contrastive)")
    p.add_argument("out", help="the study's folder (each run's checkpoint lands in "
                               "OUT/<name>-s<seed>)")
    p.add_argument("--only", default=".",
                   help="only the runs whose name-s<seed> matches this regex")
    p.add_argument("--jobs", type=number(1, kind=int), default=2,
                   help="runs at a time (one thread each)")
    p.add_argument("--preset", default="cpu", help="the preset of every run")
    p.add_argument("--device", default="cpu", help="the device of every run")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(n, s, f) for n, s, f in read_runs() if re.search(a.only, f"{n}-s{s}")]
    if not todo:
        raise SystemExit(f"--only {a.only!r}: expected a regex matching some of study/runs.txt's "
                         f"runs (name-s<seed>), e.g. '^elva-s0$'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread each: --jobs of them share the cores

    def one(name, seed, flags):
        tag = f"{name}-s{seed}"
        if not (out / tag / "model.safetensors").exists():
            cmd = [sys.executable, "-m", "study", "run", "--preset", a.preset, "--device", a.device,
                   "--init", a.init, "--out", str(out), "--stages", "elva", "--no_eval",
                   "--threads", "1", "--seed", seed, "--elva_name", tag, *flags]
            with open(out / f"{tag}.log", "w") as log:
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=HERE.parent).returncode:
                    return f"FAILED {tag}"
        if not name.startswith("toy") and not (out / f"{tag}.json").exists():
            cmd = [str(HERE.parent / "eval.py"), "--device", a.device]
            if "frozen" in flags:   # the policy writes, the frozen stage-2 model embeds
                cmd = ["-m", "study", "eval", "--scorer", a.init]
            cmd += ["--threads", "1", "--ckpt", str(out / tag), "--out", str(out / f"{tag}.json")]
            with open(out / f"{tag}.eval.log", "w") as log:
                subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=HERE.parent)
        return f"{time.strftime('%H:%M:%S')} done {tag}"

    with ThreadPoolExecutor(a.jobs) as pool:
        for msg in pool.map(lambda r: one(*r), todo):
            print(msg, flush=True)


COMMANDS = {"run": variants.run, "runs": study_runs, "audit": probes.audit, "grains": probes.grains,
            "eval": probes.eval_frozen, "transfer": probes.transfer, "compare": tables.compare,
            "ladder": tables.ladder, "seeds": tables.seeds, "curves": tables.curves,
            "precondition": tables.precondition}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        import study
        print(study.__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    one_line_errors(COMMANDS[sys.argv[1]], sys.argv[2:])
