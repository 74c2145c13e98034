"""
The study: our own variants of stages 2 and 3, the equal-compute control, and the study's runs --
everything here is ours, not the paper's. train.py is the paper; this package calls its functions
with other arguments; no file of the reference imports it.

    python -m study run [train.py's flags] [a variant's flags]  # the pipeline with variants
    python -m study runs INIT OUT [--only REGEX] [--jobs 2]     # the study's stage-3 runs
    python -m study audit --ckpt runs/cpu/contrastive           # does the reward pick better words?
    python -m study audit --ckpt ... --sample_candidates        # ... candidates' words sampled too
    python -m study grains --ckpt STAGE2 ELVA                   # where greedy summaries err
    python -m study eval --ckpt RUN --scorer STAGE2             # a frozen-scorer run's table
    python -m study transfer RUN...                             # the transfer probe's table
    python -m study compare RUN_A RUN_B                         # the same, number for number?
    python -m study ladder runs/study                           # the learnability ladder's table
    python -m study seeds RESULT.json...                        # mean +- sd per run over seeds
    python -m study precondition RESULT.json...                 # models vs the targets
    python -m study run --help                                  # every flag

Why a study: the paper's claim (Section 3.4) is that GRPO on its ranking rewards teaches what
InfoNCE misses. In this miniature the paper's configuration does not beat the control
(docs/results.md), and these variants are how we find out which step fails. Each is off by default;
`python -m study run` with none of them is `python train.py`.

Files: variants.py (the variants, the control, `run`), rewards.py (our rewards), probes.py (audit,
grains, transfer, eval), tables.py (ladder, seeds, precondition, compare), runs.txt (the study's
runs, as data).

The variants (stage: what it changes -- why):
  --control                 stage 3: stage 2's loss continued on the same candidate sets and steps
                            instead of GRPO (the equal-compute control) -- without it no claim about
                            ELVA means anything
  --reward toy|length       stage 3: a reward known to be learnable, colour words in the summaries /
                            minus their length -- checks that GRPO itself can climb (the ladder)
  --reward rank|zscore|ndcg stage 3: a scale-free reward (reward.py): the rank alone, R_total on
                            standardised scores, graded NDCG with near misses at half credit --
                            R_Rank pays for inflating scores
  --reward pool             stage 3: the positive's rank in a whole training pool embedded by the
                            stage-2 model -- denser than a rank among 9 candidates
  --best_of_g               stage 3: the next-token loss on the group's best query summary -- the
                            audit finds better summaries within sampling reach; can a policy learn
                            them?
  --credit sequence         stage 3: each summary credited for its own part of the ranking
                            (reward.sequence_credit) -- in the paper a rollout's 2 + N summaries
                            share one reward
  --advantage mean          stage 3: the group's mean as baseline, no division by its std
  --sample query            stage 3: only the query's summary is sampled, candidates keep their
                            greedy ones -- a group's rewards then differ by the query's words alone
  --empty_member            stage 3: the last rollout of each group writes no query summary -- can
                            GRPO learn to write nothing where words do not help?
  --scorer frozen           stage 3: the frozen stage-2 model embeds the rollouts (the policy only
                            writes) -- a stationary reward, as retrieval-RL systems use
  --rl_instances N          stage 3: a fixed set of N training instances -- where optimisation
                            turns into memorisation
  --probe_transfer H        stage 3: after each update, the reward of the same batch re-sampled and
                            of H held-out instances (TransferProbe) -- does an update pay elsewhere?
  --anchor W                stage 3: + W * mean cosine distance between policy and stage-2
                            embeddings of the same words -- holds the map from words to embedding
  --pathwise W              stage 3: + -W * R_total through the embeddings -- a dense gradient
  --num_iterations N        stage 3: N PPO-style updates per rollout batch (the clip acts)
  --summary_dropout_end P   stage 2: summary dropout annealed linearly to P -- [RET] learns to read
                            words late on
  --own_summaries F         stage 2: from --own_from on, a fraction F of the kept summaries are the
                            model's own greedy ones (no LM loss) -- stage 2 then reads the words it
                            writes at evaluation and in RL
  --n_train, --n_test, --rl_queries, --rl_pool_scenes, --eval_queries, --mrbench_per_task,
  --weight_decay, --warmup, --elva_name: sizes and names train.py takes from its preset
"""

