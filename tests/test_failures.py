"""What happens when things go wrong: each bad input a named one-line error, or handled."""

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
import mbeir as realdata
import retriever
import runtime
import train
from data import Item
from tests.helpers import (tiny_model, same_weights, rl_args, stage_of, printed_by, SMOKE)


def test_nan_model_scores_nothing(world, tok):
    """A model with NaN weights must never score well: its embeddings rank last and the table
    counts them."""
    ret = tiny_model(tok)
    with torch.no_grad():
        for p in ret.model.parameters():
            p.fill_(float("nan"))
    out = evaluation.standard_split(ret, world, 10, nullcontext)
    assert out["avg"]["R@5"] == 0.0 and out["avg"]["R@1"] == 0.0
    assert out["nonfinite"] > 0

@pytest.mark.parametrize("flags,pattern", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--steps", "-5"], "--steps -5: expected"),
    (["--ckpt_every", "0"], "--ckpt_every 0: expected"),
    (["--log_every", "0"], "--log_every 0: expected"),
    (["--rl_batch", "0"], "--rl_batch 0: expected"),
    (["--rl_batch", "33"], "--rl_batch 33: expected <= the RL instances"),
    (["--batch_size", "1"], "--batch_size 1: expected an integer >= 2"),
    (["--tau", "1e-30"], "--tau 1e-30: expected a finite number >= 0.005 and <= 10"),
    (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    (["--rl_lr", "inf"], "--rl_lr inf: expected a finite number > 0"),
    (["--rl_lr", "nan"], "--rl_lr nan: expected"),
    (["--beta", "-1"], "--beta -1: expected a finite number >= 0"),
    (["--summary_dropout", "2"], "--summary_dropout 2: expected a finite number >= 0 and <= 1"),
    (["--group_size", "1"], "--group_size 1: expected an integer >= 2"),
    (["--threads", "0"], "--threads 0: expected"),
    (["--vocab_size", "10"], "--vocab_size 10: expected an integer >= 300"),
    (["--stages", "pretrain"], "--stages 'pretrain': expected"),
    (["--device", "tpu"], "--device 'tpu': expected"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device 'cuda': expected a "
                                                                  "device this machine has")]))
def test_bad_flags_are_named_before_any_work(flags, pattern, tmp_path):
    with pytest.raises(SystemExit, match=pattern.replace("(", r"\(").replace("+", r"\+")):
        train.get_args(["--preset", "smoke", "--out", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()

def test_out_must_be_a_writable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit, match="--out .*expected a folder"):
        train.get_args(["--preset", "smoke", "--out", str(f)])
    # a folder that cannot be made or written (here: below a file; a read-only folder fails the same
    # way, but root, as CI runs, may write anywhere)
    with pytest.raises(SystemExit, match="--out .*: expected a folder this process can write"):
        train.main(["--preset", "smoke", "--out", str(f / "run")])

def test_bad_input_errors(tmp_path, tok):
    ret = tiny_model(tok)
    with pytest.raises(ValueError, match="empty query"):
        ret.enc.prompt(Item(text="   "), "instr")
    with pytest.raises(SystemExit, match="--preset invalid choice: 'huge'"):
        train.get_args(["--preset", "huge"])
    # M-BEIR reader: malformed record, missing field, missing image
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"did": "1", "txt": "a red circle", "img_path": None,
                                "modality": "text"}) + "\n")
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"qid": 1, "query_txt": "x"\n')
    with pytest.raises(ValueError, match="q.jsonl:1: malformed JSON"):
        realdata.read_mbeir(qf, pool)
    qf.write_text(json.dumps({"qid": 1, "query_txt": "x", "query_img_path": None,
                              "query_modality": "text"}) + "\n")
    with pytest.raises(ValueError, match="lacks field.*pos_cand_list"):
        realdata.read_mbeir(qf, pool)
    qf.write_text(json.dumps({"qid": 1, "query_txt": "x", "query_img_path": "nope.png",
                              "query_modality": "image", "pos_cand_list": ["1"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png not found"):
        realdata.read_mbeir(qf, pool, tmp_path)
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png could not be read"):
        retriever.load_image(Item(image_path=str(bad_img)), 32)

def test_non_finite_steps_are_never_applied_or_saved(world, tok, tmp_path):
    """A non-finite loss or gradient stops the run before the update is applied; non-finite
    weights are never saved; the message names the step and the checkpoint that is kept."""
    ret = tiny_model(tok)
    model = ret.model
    run, stage = stage_of(ret, rl_args(), tmp_path, name="contrastive", steps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step(loss):   # a stage's update as train.py writes it
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stage.stop_unless_finite(0, loss, gnorm)
        stage.opt.step()
    with pytest.raises(FloatingPointError, match="contrastive step 0: the loss is nan; stopping "
                                                 "before applying it; no checkpoint"):
        step(model.tok_emb.weight.sum() * float("nan"))
    # a finite loss whose gradient is NaN (injected by a hook)
    hook = model.norm.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="gradient norm is nan; stopping before applying"):
        step(model.norm.weight.sum())
    hook.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    stage.steps = 5
    stage.save_if_due(4)
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))
    stage.steps = 6
    with pytest.raises(FloatingPointError,
                       match=r"non-finite \(norm.weight and 0 more\); not saving them; the last "
                             r"checkpoint in .* \(step 4\) is kept"):
        stage.save_if_due(5)
    assert retriever.read_checkpoint(tmp_path / "contrastive")[3]["step"] == 4

def test_the_log_writes_every_step_and_prints_every_log_every(tok, tmp_path, capsys):
    ret = tiny_model(tok)
    run, stage = stage_of(ret, rl_args("--log_every", "3"), tmp_path, name="contrastive", steps=7)
    for step in range(7):
        stage.log(step, {"loss": torch.tensor(float(step)), "lr": 0.1, "masked_false_neg": step})
        lines = (tmp_path / "contrastive" / "log.jsonl").read_text().splitlines()
        assert len(lines) == step + 1
    recs = [json.loads(x) for x in lines]
    assert [r["loss"] for r in recs] == [float(i) for i in range(7)]
    assert recs[5]["masked_false_neg"] == 5
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("contrastive 0")]
    assert [x.split()[1] for x in printed] == ["00000/7", "00003/7", "00006/7"]

def test_checkpoint_is_whole_or_absent(world, tok, tmp_path, monkeypatch):
    """A kill during a save leaves the previous checkpoint whole (model.safetensors, renamed into
    place last, is the commit point, and names its optimizer file); --resume without its
    optimizer state is refused, naming the file; older optimizer files are removed."""
    ret = tiny_model(tok)
    folder = tmp_path / "ck"
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3)
    retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 19}, optimizer=opt)
    saved = {k: v.clone() for k, v in ret.model.state_dict().items()}
    with torch.no_grad():
        ret.model.norm.weight.add_(1.0)
    real = retriever.atomic_write

    # the new optimizer state lands, the new model.safetensors never does
    def killed_before_the_model(path, write):
        if Path(path).name == "model.safetensors":
            raise KeyboardInterrupt
        real(path, write)
    monkeypatch.setattr(retriever, "atomic_write", killed_before_the_model)
    with pytest.raises(KeyboardInterrupt):
        retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 29}, optimizer=opt)
    monkeypatch.setattr(retriever, "atomic_write", real)
    model, _, meta = retriever.load_checkpoint(folder)
    assert meta["step"] == 19
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert meta["optimizer"] == "optimizer-000019.pt" and (folder / meta["optimizer"]).is_file()
    # the next save removes the optimizer files it does not name
    retriever.save_checkpoint(folder, ret.model, tok, {"world": {}, "step": 31}, optimizer=opt)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer-000031.pt"]
    # --resume without the optimizer state: refused, naming the file
    out = tmp_path / "run"
    train.main(SMOKE + ["--out", str(out)])
    (out / "contrastive" / "optimizer-000005.pt").unlink()
    with pytest.raises(SystemExit, match="optimizer-000005.pt is missing"):
        train.main(SMOKE + ["--out", str(out), "--resume", "--steps", "6"])

def test_kill_and_resume_is_byte_identical_and_logs_each_step_once(tmp_path, monkeypatch):
    a, b, c = (str(tmp_path / n) for n in "abc")
    train.main(SMOKE + ["--out", a])
    train.main(SMOKE + ["--out", c])
    # deterministic
    assert same_weights(Path(a) / "contrastive", Path(c) / "contrastive")
    real = runtime.Stage.log

    def dying(self, step, rec, *a, **k):   # killed during step 4, after the step-2 checkpoint
        if step == 4:
            raise KeyboardInterrupt
        real(self, step, rec, *a, **k)
    monkeypatch.setattr(runtime.Stage, "log", dying)
    with pytest.raises(KeyboardInterrupt):
        train.main(SMOKE + ["--out", b])
    monkeypatch.setattr(runtime.Stage, "log", real)
    train.main(SMOKE + ["--out", b, "--resume"])
    assert same_weights(Path(a) / "contrastive", Path(b) / "contrastive")
    for run in (a, b):
        steps = [json.loads(line)["step"]
                 for line in (Path(run) / "contrastive" / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(6)), run
    # a second fresh run into the same folder is refused; with --overwrite it starts a fresh log
    with pytest.raises(SystemExit, match="holds a checkpoint of the contrastive stage .*--resume"):
        train.main(SMOKE + ["--out", a])
    train.main(SMOKE + ["--out", a, "--overwrite"])
    assert (Path(a) / "contrastive" / "log.jsonl").read_text().count("\n") == 6

def test_a_run_folder_keeps_its_world(tmp_path):
    out = str(tmp_path / "run")
    train.main(SMOKE + ["--out", out, "--steps", "1"])
    for flags, name in ((["--seed", "1"], "--seed 1: expected 0"),
                        (["--vocab_size", "400"], "--vocab_size 400: expected 512")):
        with pytest.raises(SystemExit, match=f"{name}: the folder .* holds a run made with it"):
            train.main(SMOKE + ["--out", out, "--steps", "1", *flags])
    train.main(SMOKE + ["--out", out, "--steps", "1", "--vocab_size", "400", "--overwrite"])
    assert retriever.load_tokenizer(Path(out) / "tokenizer.json").get_vocab_size() <= 400
    assert retriever.load_checkpoint(Path(out) / "contrastive")[0].cfg.vocab_size <= 400

def test_eval_inputs_are_checked(world, tok, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    ret = tiny_model(tok)
    # a checkpoint of another world (no GrainWorld in its record)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"step": 0})
    with pytest.raises(SystemExit, match="expected one trained on GrainWorld"):
        evaluation.evaluate(str(tmp_path / "ck"), 5, 2, "cpu", nullcontext)
    path = tmp_path / "ck" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    cfg = {**json.loads(header["config"]), "n_layers": 3}
    save_file(load_file(str(path)), str(path), {**header, "config": json.dumps(cfg)})
    # the details, not cut off
    with pytest.raises(ValueError, match="do not match the config saved with them .*blocks.2"):
        retriever.load_checkpoint(tmp_path / "ck")

def test_eval_names_the_stage_folders_of_a_run_folder(tmp_path, tok):
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "run" / "contrastive", ret.model, tok,
                            {"world": {}, "step": 0})
    with pytest.raises(SystemExit, match="a run folder, not a checkpoint"):
        evaluation.main(["--ckpt", str(tmp_path / "run")])
    # one model twice (a copy too): refused before any work (this one would fail in evaluate)
    shutil.copytree(tmp_path / "run" / "contrastive", tmp_path / "copy")
    for twice in ("run/contrastive", "copy"):
        with pytest.raises(SystemExit, match="the same weights twice in .*; expected each model"):
            evaluation.main(["--ckpt", str(tmp_path / "run" / "contrastive"),
                             "--ckpt", str(tmp_path / twice)])
    # a folder that is not there is named as such (not 'no model.safetensors')
    with pytest.raises(SystemExit, match="nowhere: no such folder"):
        evaluation.main(["--ckpt", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        retriever.Retriever.from_pretrained(tmp_path / "nowhere")
    assert train.get_args(["--margin_weight", "0.3", "--rank_weight", "0.7"]).epsilon == 0.7

def test_threads_follow_the_cores_this_process_may_use(monkeypatch, capsys):
    """--threads, else OMP_NUM_THREADS (torchrun sets 1), else the cores this process may use
    divided by the processes torchrun started on the machine: two processes at two threads each
    on two cores ran 9x slower."""
    import os
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert runtime.set_threads(None) == cores == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.set_threads(None) == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.set_threads(None) == 1 and "from OMP_NUM_THREADS" in capsys.readouterr().out
        assert runtime.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

def test_the_sample_writer_writes_only_where_nothing_is(tmp_path):
    real = tmp_path / "mbeir_root"
    real.mkdir()
    (real / "query").mkdir()                                             # a real M-BEIR root, say
    with pytest.raises(data.BadInput,
                       match="--sample .*mbeir_root: expected a new or empty folder"):
        realdata.write_mbeir_sample(real)
    assert sorted(p.name for p in real.iterdir()) == ["query"]           # nothing written
    assert (realdata.write_mbeir_sample(tmp_path / "new") / "instructions").is_dir()

def test_a_run_folder_is_one_run(tmp_path):
    """--resume continues a stage only with the flags it was made with; a fresh run does not write
    over a finished stage; --overwrite starts the first stage and every later one afresh; a stage
    whose input stage changed is never 'already complete'."""
    out = str(tmp_path / "run")
    base = ["--preset", "smoke", "--stages", "contrastive,elva", "--steps", "3", "--rl_steps", "1",
            "--no_eval", "--out", out]
    train.main(base)
    for flags, name, old in ((["--steps", "5"], "--steps 5", "3"),
                             (["--lr", "0.05"], "--lr 0.05", "0.002"),
                             (["--beta", "0.1"], "--beta 0.1", "0.2")):
        with pytest.raises(SystemExit,
                           match=f"{name}: expected {old}, the value the .* checkpoint"):
            train.main(base + ["--resume", *flags])
    # a stage compares its own flags only: stage 3's do not stop stage 2 (the stage 3 it resumes
    # then refuses them)
    with pytest.raises(SystemExit, match="--rl_lr 0.0001: expected 1e-05, the value the elva"):
        train.main(base + ["--resume", "--rl_lr", "1e-4"])
    assert "contrastive: already complete" in printed_by(base[:3] + ["contrastive"] + base[4:]
                                                              + ["--resume", "--rl_lr", "1e-4"])
    with pytest.raises(SystemExit, match="holds a checkpoint of the contrastive stage"):
        train.main(base + ["--lr", "0.01"])
    with pytest.raises(SystemExit, match="--overwrite True: expected without --resume"):
        train.main(base + ["--resume", "--overwrite"])
    elva_weights = (Path(out) / "elva" / "model.safetensors").read_bytes()
    # stage 2 afresh, and stage 3 gone
    train.main(["--preset", "smoke", "--stages", "contrastive", "--steps", "2", "--no_eval",
                "--out", out, "--overwrite", "--lr", "0.01"])
    assert not (Path(out) / "elva").exists()
    assert retriever.read_checkpoint(Path(out) / "contrastive")[3]["args"]["lr"] == 0.01
    assert elva_weights
    # a stage 3 whose stage 2 (--init, another folder) was trained again is not complete: refused
    rl = ["--preset", "smoke", "--stages", "elva", "--rl_steps", "1", "--no_eval", "--init",
          str(Path(out) / "contrastive"), "--out", str(tmp_path / "rl")]
    train.main(rl)
    train.main(["--preset", "smoke", "--stages", "contrastive", "--steps", "3", "--no_eval",
                "--out", out, "--overwrite"])
    with pytest.raises(SystemExit, match="the elva stage's input .*changed since"):
        train.main(rl + ["--resume"])

def test_the_pool_cache_is_keyed_by_the_images(mbeir, tok, tmp_path, capsys):
    """Swap two pool images: the cached embeddings are not reused (they were made of other
    bytes)."""
    import shutil
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    args = ["--ckpt", str(tmp_path / "ck"), "--mbeir", str(root), "--tasks", "sample_task0",
            "--cache", str(tmp_path / "cache"), "--threads", "1", "--out", str(tmp_path / "r.json")]
    evaluation.main(args)
    assert "pool embeddings cached in" in capsys.readouterr().out         # its place is printed
    a, b = root / "mbeir_images/sample/0.jpg", root / "mbeir_images/sample/1.jpg"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    evaluation.main(args)
    assert "from the cache" not in capsys.readouterr().out               # re-embedded

def test_inputs_are_refused_before_the_work(mbeir, tok, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--n_hard \\+ --n_rand 1002: expected fewer than the 20"):
        train.get_args(["--preset", "smoke", "--n_hard", "1000"])
    with pytest.raises(SystemExit, match="--batch_size 100000: expected at most the 400 training"):
        train.get_args(["--preset", "smoke", "--batch_size", "100000"])
    out = tmp_path / "run"
    with pytest.raises(data.BadInput, match="--eval_tasks nope: unknown task"):
        train.main(["--preset", "smoke", "--mbeir", str(mbeir), "--eval_tasks", "nope", "--out",
                    str(out)])
    assert not out.exists()                                              # before any training
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok, {"world": {}, "step": 0})
    for flag in ("--out", "--grid", "--run_file"):
        with pytest.raises(SystemExit,
                           match=f"{flag} /missing/folder/x.json: expected a file in a"):
            evaluation.main(["--ckpt", str(tmp_path / "ck"), flag, "/missing/folder/x.json"])
    with pytest.raises(SystemExit, match="--queries 0: expected an integer >= 1"):
        evaluation.main(["--ckpt", str(tmp_path / "ck"), "--queries", "0"])
    # a broken image in a pool: named before anything is embedded
    import shutil
    root = tmp_path / "m"
    shutil.copytree(mbeir, root)
    (root / "mbeir_images/sample/7.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.BadInput, match="image .*7.jpg could not be read"):
        realdata.read_mbeir_pool(realdata.mbeir_paths(root, "sample_task0")[1], root)

def test_mbeir_defects_of_the_review(mbeir, tmp_path, tok):
    """An empty reference summary is no tokens; a query none of whose positives is in the pool is
    a miss, counted (UniIR), not an error; qrels relevance > 0 is relevant; an empty qrels file
    is named."""
    assert tiny_model(tok).enc.summary("") == [] and tiny_model(tok).enc.summary(" ") == []
    ins = realdata.read_mbeir_instructions(mbeir / "instructions" / "query_instructions.tsv")
    q, p = realdata.mbeir_paths(mbeir, "sample_task0")
    pool = realdata.read_mbeir_pool(p, mbeir)
    small = realdata.MBeirPool(pool.path, pool.items[1:], pool.dids[1:], pool.modalities[1:],
                               {d: i for i, d in enumerate(pool.dids[1:])})     # 9:0 is not in it
    qs = realdata.read_mbeir_queries(q, small, mbeir, ins, strict=False)
    assert qs.missed == 1 and qs.relevant[0] == [] and qs.instructions[0]
    qrels = tmp_path / "q.txt"
    qrels.write_text("9:0 0 9:0 1 0\n9:1 0 9:1 0 0\n9:2 0 9:2 0.5 0\n9:3 0 9:3 -1 0\n")
    assert realdata.read_qrels(qrels) == {"9:0": ["9:0"], "9:2": ["9:2"]}
    qrels.write_text("")
    with pytest.raises(data.BadInput, match="q.txt: no relevant pair"):
        realdata.read_qrels(qrels)

def test_smaller_failures_are_named(world, tok, tmp_path, capsys):
    ret = tiny_model(tok)
    ck = tmp_path / "ck"
    opt = torch.optim.AdamW(ret.model.parameters(), lr=1e-3)
    retriever.save_checkpoint(ck, ret.model, tok, {"world": {}, "step": 0}, optimizer=opt)
    # inference needs no optimizer state; a training checkpoint folder is not written over
    (ck / "optimizer-000000.pt").unlink()
    r = retriever.Retriever.from_pretrained(ck)
    with pytest.raises(data.BadInput, match="save_pretrained: .* is not empty"):
        r.save_pretrained(ck)
    # a file that is not a checkpoint's: one line
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_text("{}")
    with pytest.raises(data.BadInput, match="damaged or not a checkpoint of train.py"):
        retriever.load_checkpoint(tmp_path / "x")
    # the API's arguments
    e = r.encode_text(["a red circle", "a blue square"])
    for k in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="search: k"):
            r.search(e, e, k=k)
    with pytest.raises(ValueError, match="batch_size 0"):
        r.encode_text("a circle", batch_size=0)
    with pytest.raises(TypeError, match="instruction is a int"):
        r.encode_text("a circle", instruction=5)
    if not torch.cuda.is_available():
        with pytest.raises(data.BadInput, match="device 'cuda': torch sees no CUDA GPU"):
            retriever.Retriever.from_pretrained(tmp_path / "nowhere", device="cuda")
    # a log cut short by a power loss: --resume drops its last line and goes on
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for _, r in retriever.read_log(log)] == [0, 1]
    assert "its last line is cut short" in capsys.readouterr().out
    log.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(data.BadInput, match="log.jsonl:2: not a JSON record"):
        retriever.read_log(log)

def test_errors_of_the_command_lines_are_one_line(tmp_path, mbeir):
    """A bad input to any command line is one line on stderr, no traceback (a traceback is for
    bugs)."""
    import subprocess
    import sys
    here = Path(__file__).parents[1]
    bad_ckpt = tmp_path / "ck"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{}")
    cases = [["eval.py", "--ckpt", str(bad_ckpt)], ["mbeir.py", "--sample", str(mbeir)],
             ["train.py", "--steps", "0"], ["explain.py", str(bad_ckpt)],
             ["eval.py", "--ckpt", str(mbeir), "--mbeir", str(mbeir)]]
    # started together (each is mostly torch's import), then read one by one
    runs = [subprocess.Popen([sys.executable, *argv], cwd=here, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            for argv in cases]
    for argv, run in zip(cases, runs):
        stderr = run.communicate()[1]
        assert run.returncode != 0, argv
        lines = [x for x in stderr.splitlines() if x.strip()]
        assert "Traceback" not in stderr and len(lines) <= 2, (argv, stderr)

def test_a_smoke_run_says_its_numbers_check_the_plumbing(tmp_path, capsys):
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "1", "--steps",
                "1", "--no_eval", "--threads", "1", "--out", str(tmp_path / "r")])
    assert "check the plumbing, not the method" in capsys.readouterr().out


def test_the_second_reviews_defects(mbeir, tok, tmp_path, capsys):
    """#2-#8 of the review, each as it was found: stage 3 alone on the data its --init saw (or
    refused before any work); --rl_batch against M-BEIR's instances; the pool cache keyed by
    hashes (its header no longer holds every candidate id), by the device and dtype, and by an
    unsaved model's weights; an M-BEIR miss adds 0 to MRR and is in no top K."""
    out = tmp_path / "gw"
    train.main(SMOKE + ["--out", str(out), "--steps", "1"])
    elva_only = ["--preset", "smoke", "--stages", "elva", "--no_eval", "--init",
                 str(out / "contrastive")]
    with pytest.raises(SystemExit, match=r"--mbeir .*: expected none \(GrainWorld\): the data"):
        train.main(elva_only + ["--out", str(tmp_path / "x"), "--mbeir", str(mbeir)])
    assert not (tmp_path / "x").exists()
    with pytest.raises(data.BadInput, match="--rl_batch 100: expected at most the .* RL instances"):
        train.main(["--preset", "smoke", "--mbeir", str(mbeir), "--rl_batch", "100", "--out",
                    str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()                                    # before any work
    ret, other = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    pool = realdata.read_mbeir_pool(realdata.mbeir_paths(mbeir, "sample_task0")[1], mbeir)
    key = realdata.pool_key(ret, pool, [None] * len(pool.items))
    assert key["device"] == "cpu" and key["dtype"] == "fp32" and len(json.dumps(key)) < 1000
    assert key["model_sha256"] != realdata.pool_key(other, pool, [None] * 12)["model_sha256"]
    ranks = torch.tensor([1.0, float("inf")])                   # a hit, and a miss
    assert retriever.recall_mrr(ranks) == {"R@1": 0.5, "R@5": 0.5, "R@10": 0.5, "MRR": 0.5}


def test_what_a_new_user_lost_or_was_not_told(mbeir, tok, tmp_path, capsys):
    """Section 3 of the review: each input refused in one line, or said."""
    from PIL import Image
    out = tmp_path / "run"
    train.main(SMOKE + ["--out", str(out), "--steps", "1"])
    (out / ".lock").write_text("1")                   # a live process holds the folder (init)
    with pytest.raises(SystemExit, match="--out .*: expected a folder no other run is using"):
        train.main(SMOKE + ["--out", str(out), "--steps", "1", "--resume"])
    (out / ".lock").write_text("999999999")           # a dead one: taken over, and said
    train.main(SMOKE + ["--out", str(out), "--steps", "1", "--resume"])
    assert "taking over the lock of process '999999999'" in capsys.readouterr().out
    (out / ".lock").write_text("not a pid")           # a damaged lock: taken over, not a traceback
    train.main(SMOKE + ["--out", str(out), "--steps", "1", "--resume"])
    assert "taking over the lock of process 'not a pid'" in capsys.readouterr().out
    ck = out / "contrastive"
    for flags in (["--out", str(ck / "e.json")], ["--run_file", str(ck / "model.safetensors")]):
        with pytest.raises(SystemExit, match="expected a path outside a checkpoint folder"):
            evaluation.main(["--ckpt", str(ck), *flags])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out .*notes.txt: expected a new file or an earlier"):
        evaluation.main(["--ckpt", str(ck), "--out", str(tmp_path / "notes.txt")])
    for flag in ("--eval_tasks", "--train_tasks"):
        with pytest.raises(SystemExit, match=f"{flag} 'x': expected M-BEIR tasks together with"):
            train.get_args(["--preset", "smoke", flag, "x"])
    with pytest.raises(SystemExit, match="expected a folder for runs, not an M-BEIR root"):
        train.get_args(["--preset", "smoke", "--out", str(mbeir)])
    q = realdata.mbeir_paths(mbeir, "sample_task0")[0]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(q.read_text().splitlines()[0] + "\n" + q.read_text().splitlines()[0] + "\n")
    pool = realdata.read_mbeir_pool(realdata.mbeir_paths(mbeir, "sample_task0")[1], mbeir)
    with pytest.raises(data.BadInput, match="dup.jsonl:2: qid 9:0 already on line 1"):
        realdata.read_mbeir_queries(dup, pool, mbeir)
    row = {"qry_text": "x", "qry_img_path": None, "tgt_text": ["a"],
           "tgt_img_path": ["i.png", "j.png", "k.png", "l.png"]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(data.BadInput, match="1 tgt_text beside 4 tgt_img_path"):
        realdata.read_mmeb(tmp_path / "m.jsonl", tmp_path)
    with pytest.raises(data.BadInput, match="an image of 0x0 pixels"):
        retriever.image_tensor(Image.new("RGB", (0, 0)), 32)
    with pytest.raises(SystemExit, match="OMP_NUM_THREADS 'abc': expected a whole number"):
        import os
        os.environ["OMP_NUM_THREADS"] = "abc"
        try:
            runtime.default_threads()
        finally:
            os.environ.pop("OMP_NUM_THREADS")
    r = evaluation.evaluate(str(ck), 3, 2, "cpu", nullcontext)
    with pytest.raises(SystemExit, match="hold the same weights: one model counted twice"):
        evaluation.check_pooled([r, dict(r, ckpt="copy")])
    with pytest.raises(SystemExit, match="evaluations of different sizes"):
        evaluation.check_pooled([r, dict(r, weights_sha256="x", mrbench_pools={})])
    # another world's model, evaluated alike, pools (its MRBench-mini pools differ in size)
    pools = {t: dict(p, pool=p["pool"] + 3) for t, p in r["mrbench_pools"].items()}
    other = dict(r, weights_sha256="y", world=dict(r["world"], seed=1), mrbench_pools=pools)
    evaluation.check_pooled([r, other])
