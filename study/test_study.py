"""
The study's tests (python -m pytest study): our rewards by hand, the variants' mechanics, the
control, the probes and the tables. The fixtures and helpers are the reference's (tests/).
"""

import json
import math
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import data
import elva
import retriever
import reward
import train
from study import probes, rewards, tables, variants
from tests.helpers import (SMOKE, free_ports, made_of, rl_instances, same_logs_and_weights,
                           stage_of, tiny_model, two_process_worker)

HERE = Path(__file__).resolve().parent.parent


def study_args(*flags, **kw):
    """`python -m study run`'s arguments on the smoke preset (train.py's and the variants'), then
    `kw` set on them."""
    args = variants.get_run_args(["--preset", "smoke", *flags])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_scale_free_rewards_by_hand_and_invariant():
    """Ours: rank, zscore and ndcg depend on the order (or standardised scores) only; the paper's
    R_total does not."""
    # positive at index 0: rank 2, then rank 1
    s = torch.tensor([[0.5, 0.2, 0.6, 0.1], [0.9, 0.2, 0.1, 0.3]])
    gains = torch.tensor([1.0, 0.5, 0.0, 0.0])
    assert torch.allclose(rewards.rank_reward(s), torch.tensor([1 / (1 + math.log(2)), 1.0]))
    # positive at 2, the near miss at 3
    dcg = 1 / math.log2(3) + 0.5 / math.log2(4)
    ideal = 1 + 0.5 / math.log2(3)
    assert rewards.ndcg_reward(s, gains)[0].item() == pytest.approx(dcg / ideal, abs=1e-6)
    assert rewards.ndcg_reward(s, gains)[1].item() == pytest.approx(
        (1 + 0.5 / math.log2(4)) / ideal, abs=1e-6)
    for a, b in ((2.0, 0.3), (0.5, -1.0)):                                # s -> a s + b, a > 0
        t = a * s + b
        assert torch.allclose(rewards.rank_reward(t), rewards.rank_reward(s))
        assert torch.allclose(rewards.zscore_reward(t), rewards.zscore_reward(s), atol=1e-5)
        assert torch.allclose(rewards.ndcg_reward(t, gains), rewards.ndcg_reward(s, gains))
    # the paper's: scale pays
    assert not torch.allclose(reward.total_reward(2 * s), reward.total_reward(s))
    # a collapsed list: the worst rank
    tied = torch.full((1, 4), 0.7)
    assert rewards.rank_reward(tied).item() == pytest.approx(1 / (1 + math.log(4)))
    paper_at_zero = reward.total_reward(torch.zeros(1, 4)).item()
    assert rewards.zscore_reward(tied).item() == pytest.approx(paper_at_zero)


def test_sequence_credit():
    g = torch.Generator().manual_seed(0)
    # all G rollouts embed alike: every summary's credit is the rollout's own R_total
    s = torch.rand(3, 5, generator=g)                                    # (B, C)
    S = s[:, None, None, :].expand(3, 4, 4, 5)                           # (B, G, G, C)
    want = reward.total_reward(s)                                        # (B,)
    assert torch.allclose(rewards.sequence_credit(S), want[:, None, None].expand(3, 4, 6))
    # by hand, G = 2: the query of rollout 0 meets the candidates of rollouts 0 and 1; candidate 1's
    # summary of rollout 1 is scored inside rollouts 0 and 1 with its own score swapped in
    S = torch.rand(1, 2, 2, 3, generator=g)
    c = rewards.sequence_credit(S)
    R = reward.total_reward
    assert torch.allclose(c[0, 0, 0], (R(S[0, 0, 0]) + R(S[0, 0, 1])) / 2)
    x0 = S[0, 0, 0].clone()
    # rollout 0's list, slot 1 from rollout 1
    x0[1] = S[0, 0, 1, 1]
    x1 = S[0, 1, 1].clone()                                             # rollout 1's own list
    assert torch.allclose(c[0, 1, 2], (R(x0) + R(x1)) / 2)
    # a positive summary that scores higher earns more credit; a negative one that scores higher
    # earns less
    S = torch.full((1, 2, 2, 4), 0.2)
    S[0, :, :, 0] = 0.5
    # rollout 1's positive summary: closer
    S[0, :, 1, 0] = 0.9
    # rollout 1's negative 2 summary: closer
    S[0, :, 1, 2] = 0.6
    # (gamma pinned at 0.2: at C = 4 the auto gamma is 1.26, and R_Rank *rewards* a rank-2 negative
    # for scoring high, since ln 2 - 1 < 0 -- the paper's formula, not a bug of the credit)
    c = rewards.sequence_credit(S, gamma=0.2)
    assert c[0, 1, 1] > c[0, 0, 1] and c[0, 1, 3] < c[0, 0, 3]
    with pytest.raises(ValueError, match="G, G, C"):
        rewards.sequence_credit(torch.rand(2, 3, 4))


def test_pool_rank_by_hand():
    """--reward pool's rank: 1 + the non-relevant pool items scoring at or above the best of the
    positive's own score and the relevant pool items' (pessimistic ties)."""
    # two rollouts' queries
    eq = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # pool; item 2 is relevant
    ep = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    relevant = torch.tensor([False, False, True, False])
    r = variants.pool_rank(eq, ep, relevant, s_pos=torch.tensor([0.5, 0.2]))
    # rollout 0: best relevant = max(0.5, 0.0) = 0.5; non-relevant scores 1.0, 0.6, 0.8 >= 0.5 ->
    # rank 4 rollout 1: best = max(0.2, 1.0) = 1.0; non-relevant 0.0, 0.8, 0.6 -> rank 1
    assert r.tolist() == [4, 1]


def test_one_grain_apart_matches_the_world_edits():
    rng = random.Random(0)
    w = data.GrainWorld(data.WorldConfig(seed=4, n_train=80, n_val=0, n_test=0))
    for s in w.splits["train"]:
        for kind in ("attribute", "binding", "relation"):
            t = data.scene_edit(rng, s, kind)
            if t is not None:
                assert variants.one_grain_apart(s, t) and variants.one_grain_apart(t, s), kind
        assert not variants.one_grain_apart(s, s)
    scenes = w.splits["train"][:40]
    # unrelated scenes
    assert sum(variants.one_grain_apart(a, b) for a in scenes for b in scenes) == 0


def test_grpo_learns_toy_reward(world, tok, tmp_path):
    """GRPO machinery check: with a verifiable toy reward (fraction of colour words in the
    summaries), the mean reward rises within a few dozen steps (the study's step, --reward toy)."""
    ret = tiny_model(tok, seed=1)
    ref = elva.ELVAModel(ret.model.cfg, ret.enc.img, ret.enc.ret, ret.enc.pad)
    ref.load_state_dict(ret.model.state_dict())
    ref = retriever.Retriever(ref, tok)
    run, stage = stage_of(ret, study_args("--reward", "toy", "--beta", "0", group_size=8), tmp_path,
                          lr=1e-2)
    made = made_of(ret, rl_instances(world, 1, 1))
    gen = torch.Generator().manual_seed(0)
    rewards = [variants.study_step(run.args, run, stage, ref, made, gen, s)["reward_mean"]
               for s in range(40)]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2, f"toy reward did not rise: first {first:.3f}, last {last:.3f}"


def test_control_is_stage2_continued(world, tok, monkeypatch, tmp_path):
    """The equal-compute control uses stage 2's loss exactly: summary dropout at stage 2's rate
    included."""
    ret = tiny_model(tok)
    seen = []
    real = train.teacher_forced

    def spy(*a, **k):
        seen.append(a[3])
        return real(*a, **k)
    monkeypatch.setattr(train, "teacher_forced", spy)
    run, stage = stage_of(ret, study_args(), tmp_path, name="control", lr=1e-4)
    init_meta = {"args": {"tau": 0.07, "lm_weight": 0.5, "summary_dropout": 1.0}}
    ref = retriever.Retriever(ret.model, tok, init_meta)
    variants.control_step(run.args, run, stage, ref, made_of(ret, rl_instances(world, 2, 3)), 0)
    # stage 2's rate, 1.0: every summary dropped
    assert seen and all(seen[0])


def test_sample_query_only_fixes_candidate_summaries(world, tok):
    """--sample query (ours): candidates keep their greedy summary in every rollout and are not
    trained; the queries' summaries are sampled."""
    ret = tiny_model(tok, seed=2)
    inst = rl_instances(world, 2, 2)
    args = study_args("--sample", "query", group_size=3)
    ro = variants.study_rollout(args, ret, made_of(ret, inst), torch.Generator().manual_seed(0),
                             nullcontext)
    B, G, K = ro.shape
    summ = [ro.summaries[(b * G + g) * K:(b * G + g + 1) * K] for b in range(B) for g in range(G)]
    for b in range(B):
        rows = summ[b * G:(b + 1) * G]
        # candidates: the same words in every rollout
        assert all(r[1:] == rows[0][1:] for r in rows)
    assert len({tuple(r[0]) for r in summ}) > 1                        # queries: sampled
    trained = ro.sampled.any(1).view(B, G, K)
    assert not trained[:, :, 1:].any() and trained[:, :, 0].all()
    items, instr = retriever.rollout_items(inst)
    assert ret.summarise(items[1:K], instr[1:K]) == summ[0][1:]       # the greedy summaries


def test_best_of_group_advantages_one_hot():
    ro = train.Rollout(batch={}, sampled=None, logp=None, e=torch.zeros(2, 3, 4, 1), scores=None,
                       ranks=None,
                       # B 2, G 3, K 4
                       summaries=[])
    # group 2 ties: no signal
    R = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.5]])
    A = variants.study_advantages(study_args("--best_of_g"), ro, R).view(2, 3, 4)
    assert A[0, 1, 0] == 3 and A.sum() == 3 and A[1].abs().sum() == 0


def test_frozen_scorer_embeddings_do_not_move_under_an_update(world, tok, tmp_path):
    """--scorer frozen (ours): the rollout's embeddings are the frozen stage-2 model's of the
    sampled words, so an update changes the words the policy writes but never the map from words
    to embeddings: the same words embed the same after a large update, and the reference's weights
    are untouched."""
    ret, ref = tiny_model(tok, seed=3), tiny_model(tok, seed=3)
    ref_weights = {k: v.clone() for k, v in ref.model.state_dict().items()}
    args = study_args("--scorer", "frozen", "--sample", "query", "--beta", "0", group_size=3)
    run, stage = stage_of(ret, args, tmp_path, lr=1e-2)
    made = made_of(ret, rl_instances(world, 2, 2))
    ro0, _, e_ref0 = variants.scored_rollout(args, ret, ref, made, torch.Generator().manual_seed(0),
                                          nullcontext)
    assert torch.equal(ro0.e.reshape(e_ref0.shape), e_ref0)          # the scorer's embeddings
    for step in range(2):
        variants.study_step(args, run, stage, ref, made, torch.Generator().manual_seed(step), step)
    assert any(not torch.equal(a, b) for a, b in zip(ret.model.state_dict().values(),
                                                     ref_weights.values()))   # the policy moved
    assert all(torch.equal(v, ref_weights[k]) for k, v in ref.model.state_dict().items())
    with torch.no_grad():
        _, h = ref.model.shared_prefix_logprobs(ro0.batch, args.temperature)
        again = ref.model.ret_embedding(h, ro0.batch["ret_pos"])
    assert torch.allclose(again, e_ref0, atol=1e-6)                  # the same words, the same map


def test_fixed_set_and_held_out_instances(world):
    """--rl_instances N and --probe_transfer H (ours): N training instances and H held out, drawn
    once from a seeded shuffle -- disjoint, the same on every call (a fixed set is fixed), and
    the stage-3 stream draws its batches from the training set only (the held-out ones never
    enter training)."""
    pool = [(q, []) for q in world.sample_queries(random.Random(1), 40)]
    args = study_args(rl_instances=8, probe_transfer=5, rl_batch=4)
    train_set, heldout = variants.study_instances(args, pool)
    assert len(train_set) == 8 and len(heldout) == 5
    def ids(xs):
        return [id(x) for x in xs]
    assert not set(ids(train_set)) & set(ids(heldout))
    again = variants.study_instances(args, pool)
    assert ids(again[0]) == ids(train_set) and ids(again[1]) == ids(heldout)
    # off: all instances, none held
    assert variants.study_instances(study_args(), pool) == (pool, [])
    drawn = set()
    for step in range(20):
        drawn |= set(ids(train.make_rl_batch(args, train_set, step)))
    assert drawn <= set(ids(train_set)) and len(drawn) == 8          # all of the set, nothing else


def test_transfer_probe_measures_without_training(world, tok, tmp_path):
    """TransferProbe (ours): its held-out baseline is measured before any update; after an update
    it re-samples the step's own batch (delta_same, a paired difference to the step's reward) and
    its held-out instances with one fixed seed (delta_other, to the previous measurement); it
    measures only -- no weight moves."""
    ret, ref = tiny_model(tok, seed=3), tiny_model(tok, seed=3)
    args = study_args("--sample", "query", probe_transfer=2, probe_every=1, group_size=3)
    run, stage = stage_of(ret, args, tmp_path)
    probe = variants.TransferProbe(args, rl_instances(world, 2, 2), stage)
    probe.start(ret, ref, nullcontext)                               # before any update
    with torch.no_grad():                                            # an update, by hand
        for p in ret.model.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in ret.model.state_dict().items()}
    step_batch = made_of(ret, rl_instances(world, 1, 2))
    rec = probe.after_update(ret, ref, step_batch, 0, 0.25, nullcontext)
    assert rec["delta_same"] == pytest.approx(rec["same_after"] - 0.25)
    assert rec["delta_other"] != 0.0        # the first update's change, not a 0 from after it
    again = probe.after_update(ret, ref, step_batch, 1, 0.25, nullcontext)
    assert again["other"] == rec["other"] and again["delta_other"] == 0.0   # one seed, no update
    assert all(torch.equal(v, before[k]) for k, v in ret.model.state_dict().items())


def test_empty_member_writes_no_query_summary(world, tok):
    """--empty_member (ours): the last rollout of each group writes no query summary (an
    off-policy member); its one trained token is [RET] in first place -- the choice "write
    nothing" that GRPO may learn; the other rollouts sample as usual."""
    ret = tiny_model(tok, seed=2)
    args = study_args("--empty_member", group_size=3)
    ro = variants.study_rollout(args, ret, made_of(ret, rl_instances(world, 2, 2)),
                             torch.Generator().manual_seed(0), nullcontext)
    B, G, K = ro.shape
    for b in range(B):
        last = (b * G + G - 1) * K
        assert ro.summaries[last] == [] and ro.sampled[last].tolist() == [True] + [False] * (
            ro.sampled.shape[1] - 1)
        assert ro.batch["tokens"][last, 0] == ret.enc.ret                # [RET] first
        assert all(ro.sampled[(b * G + g) * K].any() or ro.summaries[(b * G + g) * K] == []
                   for g in range(G - 1))


def test_grains_of_reads_a_reference_summary_back():
    """probes.grains_of: a summary read back into its grains. A reference summary states its own
    grains; a swapped binding or relation changes exactly that grain type."""
    ref = probes.grains_of("small red circle left of blue square")       # a caption's summary
    assert ref["entity"] == ["circle", "square"] and ref["relation"] == (["circle", "square"],
                                                                        ["left"])
    assert ref["binding"] == sorted([("small", "circle"), ("red", "circle"), ("blue", "square")])
    swapped = probes.grains_of("small blue circle left of red square")
    assert swapped["entity"] == ref["entity"] and swapped["attribute"] == ref["attribute"]
    assert swapped["binding"] != ref["binding"] and swapped["relation"] == ref["relation"]
    turned = probes.grains_of("small red circle right of blue square")
    assert turned["binding"] == ref["binding"] and turned["relation"] != ref["relation"]
    scene = probes.grains_of("small red cross middle left ; large blue circle top right")
    assert scene["relation"] == [("circle", ("top", "right")), ("cross", ("middle", "left"))]
    moved = probes.grains_of("small red cross top right ; large blue circle middle left")
    assert moved["binding"] == scene["binding"] and moved["relation"] != scene["relation"]
    assert probes.grains_of("red circle")["relation"] is None


def test_reward_audit_runs_on_a_tiny_checkpoint(world, tok, tmp_path):
    """python -m study audit on a small checkpoint: every row printed, and the oracle best of G
    is never worse than the mean sample or any reward's choice (it picks by the true rank)."""
    ret = tiny_model(tok)
    retriever.save_checkpoint(tmp_path / "ck", ret.model, tok,
                            {"world": world.cfg.__dict__, "step": 0})
    probes.audit(["--ckpt", str(tmp_path / "ck"), "--queries", "3", "--samples", "3", "--threads",
                  "1", "--device", "cpu", "--out", str(tmp_path / "audit.json")])
    res = json.loads((tmp_path / "audit.json").read_text())
    rows = res["rows"]
    assert (res["queries"] == 12 and "greedy summary" in rows
            and "best of 3 by R_total (paper)" in rows)
    oracle = rows["oracle best of 3 (true pool rank)"]["mean_rank"]
    assert all(oracle <= v["mean_rank"] + 1e-9 for k, v in rows.items()
               if k.startswith(("best", "mean")))
    assert set(res["spearman"]) >= {"R_total (paper)", "rank only", "zscore R_total",
                                    "ndcg (graded)"}
    for pick in ("likeliest", "medoid", "centroid"):                   # the label-free rows
        assert 1 <= rows[f"{pick} of the 3 samples (no label)"]["mean_rank"] <= 50
    # the paper's setting: the context candidates write their own sampled summaries per rollout;
    # what does not involve the rewards (greedy / empty / reference query summaries) is unchanged
    probes.audit(["--ckpt", str(tmp_path / "ck"), "--queries", "3", "--samples", "3", "--threads",
                  "1", "--device", "cpu", "--sample_candidates", "--out",
                  str(tmp_path / "audit_sc.json")])
    sc = json.loads((tmp_path / "audit_sc.json").read_text())
    assert sc["sample_candidates"] and not res["sample_candidates"]
    for k in ("greedy summary", "empty summary", "reference summary"):
        assert sc["rows"][k] == rows[k]
    oracle = sc["rows"]["oracle best of 3 (true pool rank)"]["mean_rank"]
    assert all(oracle <= v["mean_rank"] + 1e-9 for k, v in sc["rows"].items()
               if k.startswith(("best", "mean")))


def test_compare_counts_files_on_either_side(tmp_path, capsys):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "log.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (tmp_path / "b" / "extra.json").write_text("[1]")
    with pytest.raises(SystemExit):
        tables.compare([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "ONLY IN B  extra.json" in out and "1 of 2 files the same" in out




def test_the_study_step_without_variants_is_the_paper_step(world, tok, tmp_path):
    """variants.study_step with no variant is train.grpo_step: the same record on the paper's
    keys and the same weights; the study logs its diagnostics too."""
    inst = rl_instances(world, 2, 2)
    recs, states = [], []
    for step_fn in (train.grpo_step, variants.study_step):
        ret, ref = tiny_model(tok, seed=1), tiny_model(tok, seed=1)
        run, stage = stage_of(ret, study_args(group_size=4), tmp_path / step_fn.__name__)
        recs.append(step_fn(run.args, run, stage, ref, made_of(ret, inst),
                            torch.Generator().manual_seed(0), 0))
        states.append(ret.model.state_dict())
    paper, ours = recs
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert all(float(paper[k]) == pytest.approx(float(ours[k]), abs=1e-7) for k in paper)
    assert set(ours) > set(paper)


def test_a_study_run_keeps_the_world_and_its_own_flags(tmp_path):
    """The study's --n_train shapes the world like --seed (refused in a folder made with
    another); --resume compares every flag of the stage, recorded and current together: a study
    run does not continue a train.py stage with --control, nor train.py a study's control."""
    out = str(tmp_path / "run")
    train.main(SMOKE + ["--out", out, "--steps", "1"])
    with pytest.raises(SystemExit, match="--n_train 300: expected 400: the folder .* holds a run"):
        variants.run(SMOKE + ["--out", out, "--steps", "1", "--n_train", "300"])
    rl = ["--preset", "smoke", "--stages", "elva", "--rl_steps", "2", "--ckpt_every", "1",
          "--no_eval", "--init", str(Path(out) / "contrastive"), "--out", str(tmp_path / "rl")]
    train.main(rl)
    with pytest.raises(SystemExit, match="--control True: expected False, the value the elva"):
        variants.run(rl + ["--resume", "--rl_steps", "3", "--control"])
    control = rl[:-1] + [str(tmp_path / "control")]
    variants.run(control + ["--control"])
    with pytest.raises(SystemExit, match="--control None: expected True, the value the elva"):
        train.main(control + ["--resume", "--rl_steps", "3"])


def test_torchrun_two_processes_match_one_for_the_control(tmp_path):
    """The equal-compute control under two processes: the same losses and weights as one."""
    import torch.multiprocessing as mp
    common = ["--preset", "smoke", "--steps", "3", "--rl_steps", "2", "--no_eval", "--threads",
              "1", "--device", "cpu"]

    def runs(out):
        return [common + ["--stages", "contrastive", "--out", str(out)],
                common + ["--stages", "elva", "--control", "--elva_name", "control", "--out",
                          str(out)]]
    # the two processes start (torch's import) while this one makes the 1-process runs
    two = mp.spawn(two_process_worker, nprocs=2, join=False,
                   args=(free_ports(3), runs(tmp_path / "two"), str(tmp_path), variants.run))
    for argv in runs(tmp_path / "one"):
        variants.run(argv)
    while not two.join():
        pass
    same_logs_and_weights(tmp_path / "one", tmp_path / "two", "control",
                          keys=("loss", "infonce", "lm"))


def test_the_study_command_lines_answer_in_one_line(tmp_path):
    """A bad input to `python -m study` is one line on stderr, no traceback."""
    import subprocess
    import sys
    bad_ckpt = tmp_path / "ck"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{}")
    cases = (["audit", "--ckpt", str(bad_ckpt)], ["runs", "x", str(tmp_path), "--only", "nope"])
    # started together, then read one by one
    runs = [subprocess.Popen([sys.executable, "-m", "study", *argv], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            for argv in cases]
    for argv, run in zip(cases, runs):
        stderr = run.communicate()[1]
        lines = [x for x in stderr.splitlines() if x.strip()]
        assert run.returncode == 1 and "Traceback" not in stderr and len(lines) == 1, argv


def test_precondition_table_counts_models_at_target(tmp_path):
    """Two worlds, two models each: a row's target is met model by model; sd per world; another
    checkpoint name gets a table of its own."""
    def result(world, reads, greedy, ckpt="w/contrastive"):
        rows = {"sees": dict.fromkeys(("binding", "relation", "position", "shape", "color",
                                       "size"), 1.0),
                "says": dict.fromkeys(("binding", "relation", "entity", "cell", "exact"), 0.0),
                "reads": {"binding": reads, "relation": reads},
                "reads_text": {"binding": 0.5, "relation": 0.5}}
        return {"ckpt": ckpt, "world": {"seed": world}, "precondition": rows,
                "mrbench": {"avg": greedy},
                "headroom": {"empty": 0.5}}
    table = tables.precondition_table([result(0, 0.95, 0.6), result(0, 0.85, 0.62),
                                       result(1, 0.92, 0.4), result(1, 0.91, 0.41),
                                       result(0, 0.5, 0.3, "w/elva-s0")])
    stage2, elva = table.split("\n\n" + "checkpoints named elva-s0:")
    assert "| world 0 (1 models) |" in elva and "world 1" not in elva
    assert elva.endswith("| MRBench-mini sd over seeds | <= 0.015 | - | 0 of 0 worlds |")
    rows = {line.split(" | ")[0][2:]: line for line in stage2.splitlines()}
    assert rows["reads binding"].endswith("| 3 of 4 |")
    assert rows["sees binding"].endswith("| 4 of 4 |")
    assert rows["says relation"].endswith("| 0 of 4 |")
    assert rows["greedy - empty"].endswith("| 2 of 4 |")
    assert "0.900 +- 0.071 (0.850-0.950)" in rows["reads binding"]      # world 0
    assert rows["MRBench-mini sd over seeds"].endswith("| 2 of 2 worlds |")
    # one model counted twice (the same weights in two files) is refused
    one = dict(result(0, 0.9, 0.6), weights_sha256="same")
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(one))
    with pytest.raises(SystemExit, match="one model counted twice"):
        tables.precondition([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
