# One procedural rule per dvc.yaml stage. Everything comes from STAGES (workflow/dag.py).
for _stage in STAGES.values():

    rule:
        name:
            _stage.name
        input:
            snakemake_inputs(_stage, STAGES, workflow.basedir),
        output:
            *[directory(out) for out in _stage.outs],
            *_stage.files,
        params:
            **_stage.rule_params(),
        shell:
            _stage.cmd.replace("{", "{{").replace("}", "}}")
