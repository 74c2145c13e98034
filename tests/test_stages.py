"""The stages: InfoNCE, the rollout, GRPO's step, the pipeline end to end, torchrun."""

import math
import random
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import data
import elva
import explain
import eval as evaluation
import reward
import retriever
import train
from tests.helpers import (tiny_model, some_items, same_weights, rl_args, stage_of, made_of,
                           teacher_forced, rl_instances, two_process_worker, grpo_tensors,
                           two_process_runs, free_ports, same_logs_and_weights)


def test_info_nce_hand_computed():
    eq = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ec = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    tau = 0.5
    # row 0: logits [0.6, 0.0]/tau, target 0; row 1: logits [0.8, 1.0]/tau, target 1
    l0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0)))
    l1 = -math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))
    assert train.info_nce(eq, ec, tau).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    masked = train.info_nce(eq, ec, tau, torch.tensor([[False, True], [False, False]]))
    # a known false negative is not a negative
    assert masked.item() == pytest.approx((0.0 + l1) / 2, abs=1e-6)

def test_summary_dropout_empties_summary_and_leaves_lm_loss(world, tok):
    ret = tiny_model(tok)
    _, items, instr = some_items(world, 4)
    drop = [True, False, True, False]
    e, logp, lm_mask = teacher_forced(ret, items, instr, drop)
    assert e.shape[0] == 4 and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    # dropped rows: no LM loss at all
    assert lm_mask[0].sum() == 0 and lm_mask[2].sum() == 0
    assert lm_mask[1].sum() == len(ret.enc.summary(items[1].summary)) + 1
    assert torch.all(logp[~lm_mask] == 0)
    # a dropped row embeds the prompt alone: [RET] right after "ASSISTANT:"
    b, imgs = ret.batch(items[:1], instr[:1], [[]])
    assert torch.allclose(e[0], ret.model.embed(b, imgs)[0], atol=1e-5)

def test_nli_triplets_and_the_text_stage(tmp_path, world):
    """Stage 1 in miniature: every premise holds of its scene, so does the caption it entails
    (and the entailed caption holds of every scene the premise holds of, checked over the world),
    the contradiction does not; then `--stages text,contrastive` trains stage 1 and starts stage
    2 from it."""
    rng = random.Random(0)
    scenes = world.splits["train"]
    n = 0
    for s in scenes[:60]:
        t = data.nli_triplet(rng, s)
        if t is None:
            continue
        premise, hyp, contra = t
        n += 1
        assert data.satisfies(s, premise) and data.satisfies(s, hyp) and not data.satisfies(s,
                                                                                            contra)
        assert hyp.text() != premise.text() and premise.n_grains() >= 2
        # entailment
        assert all(data.satisfies(o, hyp) for o in scenes if data.satisfies(o, premise))
    assert n >= 50
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "3", "--steps",
                "1", "--out", str(out), "--no_eval"])
    text = retriever.load_checkpoint(out / "text")[0]
    _, cfg, _, meta = retriever.read_checkpoint(out / "text")
    assert meta["step"] == 2
    stage2 = retriever.load_checkpoint(out / "contrastive")[0]
    fresh = elva.build_model(elva.ModelConfig(**cfg),
                             retriever.load_tokenizer(out / "tokenizer.json"))
    # one step of stage 2 moved the weights a little from stage 1's, not from a fresh model's
    d_text = sum((a - b).abs().sum() for a, b in zip(text.parameters(), stage2.parameters()))
    d_fresh = sum((a - b).abs().sum() for a, b in zip(fresh.parameters(), stage2.parameters()))
    assert d_text < d_fresh
    with pytest.raises(SystemExit, match="text together with contrastive"):
        train.get_args(["--stages", "text,elva"])

def test_rollout_shapes(world, tok):
    ret = tiny_model(tok)
    args = rl_args(group_size=3)
    ro = train.rollout(args, ret.model, made_of(ret, rl_instances(world, 2, 3)),
                       torch.Generator().manual_seed(0), nullcontext)
    assert ro.shape == (2, 3, 2 + 3) and ro.scores.shape == (2, 3, 1 + 3)
    assert ro.e.shape[:3] == (2, 3, 5)
    assert reward.total_reward(ro.scores).shape == (2, 3)
    assert ro.logp.shape[0] == 2 * 3 * (2 + 3) and ro.logp.requires_grad
    # each item's prompt held once
    assert ro.batch["prompt_tokens"].shape[0] == 2 * (2 + 3)

def test_forced_ret_is_not_trained(world, tok):
    """A [RET] appended after max_summary_len tokens was not sampled: it is outside the tokens
    GRPO trains."""
    ret = tiny_model(tok)
    # most summaries run out of tokens
    ret.model.cfg.max_summary_len = 2
    args = rl_args(group_size=2)
    ro = train.rollout(args, ret.model, made_of(ret, rl_instances(world, 1, 2)),
                       torch.Generator().manual_seed(0),
                       nullcontext)
    rows = torch.arange(len(ro.summaries))
    # sampled its [RET] within 2 tokens
    ended = [len(s) < 2 for s in ro.summaries]
    assert ro.sampled[rows, ro.batch["ret_pos"]].tolist() == ended and not all(ended)
    # every other summary token is trained
    assert torch.equal(ro.sampled | (ro.batch["gen_mask"] & ~ro.sampled), ro.batch["gen_mask"])
    assert int((ro.batch["gen_mask"] & ~ro.sampled).sum()) == ended.count(False)

def test_rollout_ranks_are_the_rewards_ranks(world, tok):
    """The rollout scores and ranks in one pass (kernels.cosine_ranks, positive last); the reward
    read from those ranks equals the reward that ranks the scores itself."""
    ret = tiny_model(tok)
    ro = train.rollout(rl_args(group_size=3), ret.model, made_of(ret, rl_instances(world, 2, 3)),
                       torch.Generator().manual_seed(0), nullcontext)
    r, _ = reward.ranks_with_positive_last(ro.scores)
    assert torch.equal(ro.ranks[..., 0], r)
    assert torch.equal(reward.total_reward(ro.scores, ranks=ro.ranks),
                       reward.total_reward(ro.scores))

def test_grpo_step_is_the_paper_step_and_its_clip_is_inert(world, tok, tmp_path):
    """train.grpo_step takes no hook (the reward and advantage are inline) and, on-policy, its
    ratio is exactly 1: the clip never acts; its update moves the policy, not the reference."""
    import inspect
    assert list(inspect.signature(train.grpo_step).parameters) == ["args", "run", "stage", "ref",
                                                                   "made", "gen", "step"]
    ret, ref = tiny_model(tok, seed=1), tiny_model(tok, seed=1)
    run, stage = stage_of(ret, rl_args(group_size=4), tmp_path)
    before = {k: v.clone() for k, v in ret.model.state_dict().items()}
    rec = train.grpo_step(run.args, run, stage, ref, made_of(ret, rl_instances(world, 2, 2)),
                          torch.Generator().manual_seed(0), 0)
    assert rec["clip_low"] == 0 and rec["clip_high"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in ret.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())

def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    """train.py --preset smoke (shortened) writes loadable checkpoints for both stages, then
    resumes as a no-op; explain.py walks one RL instance of the stage-2 checkpoint through
    the paper's step."""
    out = tmp_path / "run"
    common = ["--preset", "smoke", "--out", str(out), "--steps", "6", "--rl_steps", "2",
              "--no_eval"]
    train.main(common)
    for stage in ("contrastive", "elva"):
        model, _, meta = retriever.load_checkpoint(out / stage)
        assert meta["stage"] == stage
        assert (out / stage / "log.jsonl").read_text().count("\n") >= 2
    first = (out / "elva" / "model.safetensors").read_bytes()
    train.main(common + ["--resume"])
    # complete stages are not re-run
    assert (out / "elva" / "model.safetensors").read_bytes() == first
    # stage 3 follows the paper: the vision tower and projector stay frozen, the language model
    # moves
    init, rl = (retriever.load_checkpoint(out / "contrastive")[0],
                retriever.load_checkpoint(out / "elva")[0])
    assert all(torch.equal(a, b) for a, b in zip(init.vision_parameters(), rl.vision_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(init.blocks.parameters(),
                                                     rl.blocks.parameters()))
    capsys.readouterr()
    explain.main([str(out / "contrastive"), "--task", "t2i"])
    shown = capsys.readouterr().out
    G = train.get_args(["--preset", "smoke"]).group_size
    assert ("task t2i" in shown and shown.count("ranked list:") == G
            and shown.count("advantage") == G + 1)
    assert "negative 4:" in shown and "R_Margin" in shown and "R_total mean" in shown
    evaluation.main(["--ckpt", str(out / "contrastive"), "--queries", "6", "--mrbench_per_task",
                     "2", "--threads", "1"])
    shown = capsys.readouterr().out
    for row in ("sees binding: reference summary likelier than its edit (own image / another's)",
                "sees relation", "sees position", "says binding: greedy image summaries right",
                "says relation", "reads binding: near-miss win, reference summaries on both sides",
                "reads relation (text): caption nearer its rewording than a contradiction"):
        assert f"| {row}" in shown, row

def test_the_run_prints_each_stages_minutes(tmp_path, capsys):
    """Stage lines carry the stage's ETA; the run ends with its time and each stage's minutes."""
    train.main(["--preset", "smoke", "--stages", "text,contrastive", "--text_steps", "3", "--steps",
                "2", "--no_eval", "--threads", "1", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "text 00000/3" in out and "| eta " in out
    assert re.search(r"total time \d+\.\d min \(text \d+\.\d \| contrastive \d+\.\d\)", out)

def test_dataloader_workers_change_nothing_but_speed(tmp_path):
    """Every stage makes its batches in DataLoader workers from per-step seeds: any number of
    workers trains the same bytes."""
    base = ["--preset", "smoke", "--stages", "text,contrastive,elva", "--text_steps", "3",
            "--steps", "4", "--rl_steps", "2", "--no_eval", "--threads", "1"]
    train.main(base + ["--out", str(tmp_path / "w0"), "--workers", "0"])
    train.main(base + ["--out", str(tmp_path / "w2"), "--workers", "2"])
    for stage in ("text", "contrastive", "elva"):
        assert same_weights(tmp_path / "w0" / stage, tmp_path / "w2" / stage), stage

def test_import_reward_and_train_stay_light():
    """import reward needs only torch (no Triton); import train loads neither eval.py nor
    mbeir.py."""
    import subprocess
    import sys
    code = ("import sys; import reward; assert 'triton' not in sys.modules and 'kernels' not in "
            "sys.modules; "
            "import train; assert 'eval' not in sys.modules and 'mbeir' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

def test_torchrun_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    ports = free_ports(3)
    # the two processes start (torch's import) while this one makes the 1-process runs
    two = mp.spawn(two_process_worker, nprocs=2, join=False,
                   args=(ports, two_process_runs(tmp_path / "two"), str(tmp_path)))
    for argv in two_process_runs(tmp_path / "one"):
        train.main(argv)
    while not two.join():
        pass
    # (stage 2 from stage 1 differs by more: AdamW's first steps amplify summation-order noise)
    for run, stage in (("a", "text"), ("b", "contrastive")):
        same_logs_and_weights(tmp_path / "one" / run, tmp_path / "two" / run, stage)
    # the text stage never touches the vision tower: no process gives it a gradient, so AdamW
    # leaves it alone under two processes as under one (no weight decay)
    text = retriever.load_checkpoint(tmp_path / "two" / "a" / "text")[0]
    assert torch.equal(text.vit_norm.weight, torch.ones_like(text.vit_norm.weight))
    # GRPO under torchrun: each process samples its own rollouts (its own seed), so a 2-process run
    # is not the same draw as a 1-process run; for the same rollouts, the processes' mean loss and
    # averaged gradient are the batch's
    logp, old, ref, A, mask = grpo_tensors()
    x = logp.clone().requires_grad_()
    loss, _ = reward.grpo_loss(x, old, ref, A, mask, 0.2, 0.2)
    loss.backward()
    (l0, g0), (l1, g1) = (torch.load(tmp_path / f"grpo{r}.pt") for r in (0, 1))
    assert ((l0 + l1) / 2).item() == pytest.approx(loss.item(), rel=1e-6)
    # average_gradients divides by 2
    assert torch.allclose(torch.cat([g0, g1]) / 2, x.grad, atol=1e-7)
