# One procedural rule per dvc.yaml stage (a `foreach` stage gives one rule per item, `ppo_seed@3` ->
# `ppo_seed_3`). Everything comes from STAGES (workflow/dag.py).
# The rule is made inside a function: Snakemake evaluates `shell:` again when the job runs, and a
# bare loop variable would by then name the last stage for every rule.
# Threads: Snakemake sets OMP_NUM_THREADS (torch's thread count) to a rule's threads. A plain stage
# takes every core it is given; the stages of one `foreach` (the PPO seeds) share them, so that
# independent seeds run side by side under `--cores N`.
# Resources: run_folder (Snakefile) keeps two of the run's stages from running at once, since each
# holds the run folder's lock; seeds' stages ask for none.


def _stage_rule(stage):
    rule:
        name:
            stage.rule_name
        input:
            snakemake_inputs(stage, STAGES, workflow.basedir),
        output:
            *[directory(out) for out in stage.outs],
            *stage.files,
        params:
            **stage.rule_params(),
        threads: max(1, workflow.cores // stage.group_size)
        resources:
            run_folder=int(stage.locks_run_folder),
        shell:
            stage.cmd.replace("{", "{{").replace("}", "}}")


for _stage in STAGES.values():
    _stage_rule(_stage)
