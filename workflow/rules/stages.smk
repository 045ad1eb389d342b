# One procedural rule per dvc.yaml stage. Everything comes from STAGES (workflow/dag.py).
# The rule is made inside a function: Snakemake evaluates `shell:` again when the job runs, and a
# bare loop variable would by then name the last stage for every rule.


def _stage_rule(stage):
    rule:
        name:
            stage.name
        input:
            snakemake_inputs(stage, STAGES, workflow.basedir),
        output:
            *[directory(out) for out in stage.outs],
            *stage.files,
        params:
            **stage.rule_params(),
        shell:
            stage.cmd.replace("{", "{{").replace("}", "}}")


for _stage in STAGES.values():
    _stage_rule(_stage)
