#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian's packages (scripts/apt-packages-slurm.txt,
# installed by scripts/setup.sh as root): munged, slurmctld and slurmd, as root, with every config,
# key, socket, spool, log and pid file under one state folder; nothing in /etc, and one link in /run
# (see link_run_conf).
#
#   scripts/slurm-local.sh start [DIR]   # DIR defaults to $SLURM_LOCAL_DIR or /tmp/qlora-slurm
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch, squeue, scontrol and snakemake --executor slurm use it
#   scripts/slurm-local.sh stop [DIR]
#
# No accounting daemon (slurmdbd): the Snakemake executor plugin polls jobs with squeue when told to
# (tests/test_slurm.py sets its status_command to squeue), which needs finished jobs to stay in
# slurmctld for a while (MinJobAge). Every finished job is also appended to DIR/jobcomp.log
# (jobcomp/filetxt), a record that the tests read. The node offers this machine's cores and memory
# and no GPU; SLURM_LOCAL_PORT picks the two ports (PORT, PORT+1) if the default is taken.
set -euo pipefail

cmd=${1:-}
dir=$(realpath -m "${2:-${SLURM_LOCAL_DIR:-/tmp/qlora-slurm}}")
port=${SLURM_LOCAL_PORT:-16817}
RUN_CONF=/run/slurm/conf

die() { echo "slurm-local: $*" >&2; exit 1; }

stop() {
  # This cluster's jobs go first (all of them are this folder's), so that none outlives its slurmd.
  if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF="$dir/slurm.conf" scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  # slurmd first, so that slurmctld does not mark the node down meanwhile; munged last.
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
  done
  if [ "$(readlink "$RUN_CONF" 2>/dev/null)" = "$dir" ]; then rm -f "$RUN_CONF"; fi
}

# SLURM's clients read $SLURM_CONF, else /etc/slurm/slurm.conf, else /run/slurm/conf/slurm.conf (where a
# configless slurmd keeps its copy). The executor plugin's srun inside a job runs without SLURM_CONF
# (snakemake-executor-plugin-slurm-jobstep drops every SLURM_* variable from the step's environment),
# so the folder is linked at /run/slurm/conf, a runtime path, unless something else is there already.
link_run_conf() {
  if [ -e /etc/slurm/slurm.conf ]; then
    echo "slurm-local: warning: /etc/slurm/slurm.conf exists; srun inside jobs will read it, not $dir/slurm.conf" >&2
  elif [ -e "$RUN_CONF" ] && [ "$(readlink "$RUN_CONF")" != "$dir" ]; then
    echo "slurm-local: warning: $RUN_CONF exists; srun inside jobs will read it, not $dir/slurm.conf" >&2
  else
    mkdir -p "$(dirname "$RUN_CONF")" && ln -sfn "$dir" "$RUN_CONF"
  fi
}

write_config() {
  local node cpus mem_mb
  node=$(hostname -s)
  cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc, which OMP_NUM_THREADS lowers
  # What the node offers jobs: the machine's memory less 1 GiB for the daemons and the system.
  mem_mb=$(( $(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  mkdir -p "$dir/ctld" "$dir/spool" "$dir/munge"
  chmod 700 "$dir/munge"
  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster, not a template for a real one.
ClusterName=qlora-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# No cgroups in a container: track processes by parent pid, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
# Jobs stay visible to squeue for 10 minutes after they end: the executor plugin's status polls.
MinJobAge=600
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that names no memory gets 1 GiB per core, not the whole node.
DefMemPerCPU=1024
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
  chmod 600 "$dir/munge/munge.key"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (the daemons run as root here)"
  for bin in munged mungekey slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || die "$bin not found: install scripts/apt-packages-slurm.txt (scripts/setup.sh does, as root)"
  done
  stop
  write_config
  export SLURM_CONF="$dir/slurm.conf"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
  slurmctld -i  # -i: ignore state left by an earlier cluster in the same folder
  slurmd
  link_run_conf
  # Ready when the node reports idle (slurmd registered with slurmctld).
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    if [ "$state" = idle ]; then
      echo "slurm-local: up; export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm-local: the node did not come up (state: ${state:-none}); logs in $dir" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop; echo "slurm-local: stopped" ;;
  *) die "usage: $0 start|stop [STATE_DIR]" ;;
esac
