"""The DAG's stages, one module each, in pipeline order: data, base, sft, reward (the rm verb), ppo,
evaluate, figures, paper, and the seed study's report, seeds. Each has `run(config, paths)`, which
its CLI verb calls (cli.STAGES). What they share lives one level up: config, precision, models,
tokens, training, actor (PPO's shared-base roles), data and hh / synthetic (reading and making
data), paths, atomic, memory (the planner)."""
