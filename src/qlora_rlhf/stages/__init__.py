"""The DAG's stages, one module each and named by its CLI verb, in pipeline order: data, base, sft, rm,
ppo, evaluate, figures, paper, and the seed study's report, seeds. Each has `run(config, paths)`, which
its CLI verb calls (cli.STAGES). What they share lives one level up: config, precision, models,
tokens, training, actor (SharedBaseRoles: policy, reference and reward on one base), generation (the
sampler's engine), data and hh / synthetic (reading and making data), stats (the policies compared,
win rates, intervals), paths, atomic, memory (the planner)."""
