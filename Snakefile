# Second front door to the DAG in dvc.yaml: one rule per DVC stage, derived, never hand-written.
#   snakemake --cores 1            # the run of run.seed, up to the paper
#   snakemake --cores 1 figures    # up to the figures
#   snakemake --cores 2 seeds      # the seed study: every seed of seeds.ppo (side by side), its report
# Rerun triggers: mtime of inputs (code + upstream outputs), the shell command, and `params:`,
# which carries the values of exactly the params.yaml keys the DVC stage declares.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from dag import load_stages, snakemake_inputs  # noqa: E402
from dvc_record import RecordError, ran_stages, record  # noqa: E402

configfile: "params.yaml"

STAGES = load_stages(Path(workflow.basedir) / "dvc.yaml", config)

# One writer per results folder (src/qlora_rlhf/lock.py): each of the run's stages holds
# results/<run>/ while it runs, so Snakemake starts one at a time (data and base, which the DAG
# allows side by side, would otherwise collide and one would be refused); a seed's stages hold only
# their seed's folder and ask for none of this resource, so seeds still run side by side.
if "run_folder" not in workflow.global_resources:
    workflow.register_resource("run_folder", 1)


rule all:
    default_target: True
    input:
        STAGES["paper"].outputs,


include: "workflow/rules/stages.smk"


# One record per results folder: the stages this run executed go into dvc.lock and DVC's cache, as
# `dvc repro` would have written them (workflow/dvc_record.py); after a failure, those that finished.
# Not after --touch, which runs nothing.
def _record_in_dvc():
    if workflow.touch:
        return
    try:
        record(workflow.basedir, ran_stages(workflow, STAGES))
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


onsuccess:
    _record_in_dvc()


onerror:
    _record_in_dvc()
