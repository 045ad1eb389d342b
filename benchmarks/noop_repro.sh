#!/usr/bin/env bash
# Overhead of the two front doors on a finished run: how long `dvc repro` takes when nothing
# changed (hashing deps/outs against dvc.lock), `snakemake --cores 1 -n` (a dry run that plans
# the DAG) and `snakemake --cores 1 figures` with nothing to do. Run it after a full
# `dvc repro` (or `make run`); it does not start any training (a stage that is out of date is
# reported, not rerun: dvc uses --dry, snakemake -n first).
#
#   bash benchmarks/noop_repro.sh [repeats=3]
# Writes benchmarks/results/noop_repro.json.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
export PATH="$PWD/.venv/bin:$PATH"
out=benchmarks/results/noop_repro.json
mkdir -p benchmarks/results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# seconds for one run of "$@" (stdout/stderr kept in $tmp/last.log); fails if the command fails
time_once() {
  local start end
  start=$(date +%s.%N)
  "$@" >"$tmp/last.log" 2>&1
  end=$(date +%s.%N)
  python3 -c "print(round($end - $start, 3))"
}

# name, then the command: records times, or why it was skipped
measure() {
  local name=$1; shift
  local times=()
  for _ in $(seq "$repeats"); do
    if ! t=$(time_once "$@"); then
      echo "$name: failed: $(tail -3 "$tmp/last.log" | tr '\n' ' ')" >&2
      echo "\"$name\": {\"skipped\": \"command failed\", \"command\": \"$*\"}," >>"$tmp/parts"
      return 0
    fi
    times+=("$t")
  done
  echo "$name: ${times[*]} s"
  echo "\"$name\": {\"command\": \"$*\", \"seconds\": [$(IFS=,; echo "${times[*]}")]}," >>"$tmp/parts"
}

: >"$tmp/parts"
if [ -f dvc.yaml ] && command -v dvc >/dev/null; then
  if dvc status -q >/dev/null 2>&1; then up_to_date=true; else up_to_date=false; fi
  echo "\"dvc_up_to_date\": $up_to_date," >>"$tmp/parts"
  if [ "$up_to_date" = true ]; then
    measure dvc_repro_noop nice -n 10 dvc repro
  else
    echo "dvc: the pipeline is not up to date (dvc status); timing a dry run only" >&2
    measure dvc_repro_dry nice -n 10 dvc repro --dry
  fi
  measure dvc_status nice -n 10 dvc status
else
  echo "\"dvc\": {\"skipped\": \"no dvc.yaml or no dvc\"}," >>"$tmp/parts"
fi
if [ -f Snakefile ] && command -v snakemake >/dev/null; then
  measure snakemake_dry_run nice -n 10 snakemake --cores 1 -n
  if grep -q "Nothing to be done" "$tmp/last.log"; then
    measure snakemake_figures_noop nice -n 10 snakemake --cores 1 figures
  else
    echo "snakemake: jobs pending (see snakemake -n); not running the full target" >&2
    echo "\"snakemake_figures_noop\": {\"skipped\": \"jobs pending\"}," >>"$tmp/parts"
  fi
else
  echo "\"snakemake\": {\"skipped\": \"no Snakefile or no snakemake\"}," >>"$tmp/parts"
fi

python3 - "$out" "$tmp/parts" <<'PY'
import json, os, platform, sys, time
target, parts = sys.argv[1], open(sys.argv[2]).read().rstrip().rstrip(",")
payload = json.loads("{" + parts + "}")
for value in payload.values():
    if isinstance(value, dict) and value.get("seconds"):
        value["median_seconds"] = sorted(value["seconds"])[len(value["seconds"]) // 2]
payload["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
payload["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
tmp = target + ".tmp"
with open(tmp, "w") as handle:
    json.dump(payload, handle, indent=2, sort_keys=True)
os.replace(tmp, target)
print(f"wrote {target}")
PY
