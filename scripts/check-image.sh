#!/usr/bin/env bash
# Builds the project's Dockerfile and runs the result, on a machine without a Docker engine and
# without access to the nvidia/cuda base image: a Debian 12 root, with network only to the package
# registries. Not part of CI: it downloads and builds gigabytes (about half an hour on 2 cores).
#
#   bash scripts/check-image.sh [--rm]        # as root, on Debian 12
#
# 1. installs buildah, podman and debootstrap from Debian's archive;
# 2. makes a Debian 12 base (`debootstrap --variant=minbase bookworm`) and imports it as a local
#    image (the Dockerfile supports Ubuntu 22.04, its default CUDA base, and Debian 12);
# 3. builds the committed HEAD (a fresh clone, as a reviewer has it, with .git for DVC) with
#    `buildah bud --isolation chroot --build-arg BASE_IMAGE=<that base>`, with pip configured as on
#    this machine (the CPU torch wheel from local folders) through a pip.conf that is bind-mounted
#    for the build only: nothing of it is written into the project or kept in the image;
# 4. runs inside the image, as the user the image defines (`buildah run --isolation chroot`;
#    `podman run` does not work where crun's setrlimit is refused), each in a fresh container:
#    `qlora-rlhf validate`, the fast tests (`pytest -m "not slow"`; PYTEST_ARGS overrides), and the
#    smoke DAG exactly as a reviewer runs a profile: `cp configs/smoke.yaml params.yaml && dvc repro`,
#    then a second `dvc repro` that must do nothing;
# 5. writes benchmarks/results/check_image.json (machine, base, image size, each step's time and
#    outcome) and benchmarks/results/check_image.log (everything the steps printed).
#
# --rm removes the image, the base and the scratch folder at the end (the JSON and log stay).
# CHECK_IMAGE_WORK (default /var/tmp/qlora-rlhf-check-image) holds the root file system, the build
# context and the pip.conf; an existing base image is reused (delete it to time debootstrap again).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${CHECK_IMAGE_WORK:-/var/tmp/qlora-rlhf-check-image}
base_tag=localhost/qlora-rlhf-base:debian12-minbase
image_tag=localhost/qlora-rlhf:check
default_pytest_args='-q -m "not slow" -p no:cacheprovider'   # (quotes inside ${:-} would be lost)
pytest_args=${PYTEST_ARGS:-$default_pytest_args}
results=$repo/benchmarks/results
json=$results/check_image.json
log=$results/check_image.log
remove=false
[ "${1:-}" = --rm ] && remove=true

[ "$(id -u)" = 0 ] || { echo "check-image: run as root (apt-get, debootstrap, buildah)" >&2; exit 1; }
mkdir -p "$work" "$results"
steps=$work/steps.jsonl
: >"$steps"
: >"$log"
exec > >(tee -a "$log") 2>&1

containers=()
cleanup() {
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

# step NAME COMMAND...: runs it, logs its output, records seconds and the exit status; stops the
# script (after writing the JSON) when a step fails.
failed=""
step() {
  local name=$1; shift
  echo
  echo "=== $name: $* ($(date -u +%FT%TZ))"
  local start end rc=0
  start=$(date +%s.%N)
  "$@" || rc=$?
  end=$(date +%s.%N)
  python3 - "$name" "$rc" "$start" "$end" "$*" >>"$steps" <<'EOF'
import json, sys
name, rc, start, end, cmd = sys.argv[1:]
print(json.dumps({"step": name, "seconds": round(float(end) - float(start), 1), "exit_status": int(rc),
                  "command": cmd}))
EOF
  echo "=== $name: exit $rc after $(python3 -c "print(round($end - $start, 1))") s"
  if [ "$rc" != 0 ]; then failed=$name; finish; exit "$rc"; fi
}

# in_image NAME SHELL-COMMAND: a fresh container of the image, the command run by bash in the image's
# working directory as the image's own user (no --user: that the image defines uid 1000 is checked).
in_image() {
  local name=$1 cmd=$2 ctr
  buildah rm "qlora-rlhf-check-$name" >/dev/null 2>&1 || true   # left by an interrupted run
  ctr=$(buildah from --pull-never --name "qlora-rlhf-check-$name" "$image_tag")
  containers+=("$ctr")
  # offline: the image must hold everything the embedded default needs; no progress bars in the log
  step "$name" buildah run --isolation chroot --env HF_HUB_OFFLINE=1 --env DVC_NO_ANALYTICS=1 --env TQDM_DISABLE=1 \
    "$ctr" -- bash -c "$cmd"
}

install_tools() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah podman debootstrap fuse-overlayfs uidmap ca-certificates git >/dev/null
  buildah version | head -1; podman --version; debootstrap --version
}

make_base() {
  if podman image exists "$base_tag"; then
    echo "reusing $base_tag (podman rmi $base_tag to make it again)"
    base_reused=true
    return 0
  fi
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian
  # the sources of Debian's own debian:12 image: updates and security too
  cat >"$work/rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$base_tag"
  rm -rf "$work/rootfs"
}

# The build context: a clone of the committed HEAD (a reviewer's checkout), so work in progress in
# this checkout neither reaches the image nor hides a file that was never committed.
make_context() {
  rm -rf "$work/context"
  git clone --quiet --no-hardlinks "$repo" "$work/context"
  git -C "$work/context" log --oneline -1
}

# pip.conf for the build: this machine's effective pip settings (`pip config list`, where the
# environment overrides the files), with the constraint file and the CA bundle copied next to it
# and each local folder it names listed for a read-only bind mount at the same path.
make_pip_conf() {
  rm -rf "$work/pip"; mkdir -p "$work/pip"
  python3 -m pip config list | python3 -c '
import re, shlex, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
keep = ("find-links", "index-url", "extra-index-url", "constraint", "cert", "default-timeout")
settings = {}
for line in sys.stdin:
    m = re.match(r"^(:env:|global|install)\.([\w-]+)=(.*)$", line.strip())
    if m and m.group(2) in keep:
        scope, key, value = m.groups()
        if scope == ":env:" or key not in settings:   # the environment overrides the config files
            settings[key] = shlex.split(value)[0]
mounts = set()
for key in ("constraint", "cert"):
    if key in settings:
        name = "constraints.txt" if key == "constraint" else "ca-bundle.crt"
        shutil.copy(settings[key], out / name)
        settings[key] = f"/run/check-image-pip/{name}"
for key in ("find-links", "index-url", "extra-index-url"):
    for item in settings.get(key, "").split():
        path = Path(item.removeprefix("file://"))
        if path.is_absolute() and path.is_dir():
            # the pages of an index link to its files by relative URLs (../../files/...): mount its root
            mounts.add(str(path.parent if key != "find-links" and path.name == "simple" else path))
(out / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
(out / "mounts").write_text("".join(f"{m}\n" for m in sorted(mounts)))
' "$work/pip"
  cat "$work/pip/pip.conf"
  echo "mounted read-only for the build: $(tr '\n' ' ' <"$work/pip/mounts")"
}

build_image() {
  local volumes=(--volume "$work/pip:/run/check-image-pip:ro")
  while read -r dir; do [ -n "$dir" ] && volumes+=(--volume "$dir:$dir:ro"); done <"$work/pip/mounts"
  # --format docker: keeps SHELL (bash with pipefail), as Docker does; OCI images drop it.
  # --layers: a rerun after a fix reuses the unchanged steps (apt, the locked stack).
  # --force-rm: a failed build leaves no working container behind (it pins its layers on disk).
  nice -n 10 buildah bud --isolation chroot --format docker --layers --force-rm --pull-never \
    --build-arg "BASE_IMAGE=$base_tag" --build-arg PIP_CONFIG_FILE=/run/check-image-pip/pip.conf \
    "${volumes[@]}" -t "$image_tag" "$work/context"
}

finish() {
  python3 - "$steps" "$json" "$base_tag" "$image_tag" "$failed" "${base_reused:-false}" "$work" "$log" <<'EOF'
import json, os, platform, subprocess, sys
steps_file, out, base, image, failed, reused, work, log_file = sys.argv[1:]

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

def inspect(tag, fmt):
    return sh("podman", "image", "inspect", "--format", fmt, tag)

os_release = dict(line.split("=", 1) for line in open("/etc/os-release").read().split("\n") if "=" in line)
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
size = inspect(image, "{{.Size}}")
steps = [json.loads(l) for l in open(steps_file) if l.strip()]
log_text = open(log_file, errors="replace").read()
for s in steps:
    if s["step"] == "build":   # a rerun after a fix reuses unchanged layers: read its time with this
        s["cached_steps"] = log_text.count("--> Using cache")
result = {
    "ok": not failed and any(s["step"] == "smoke_dag" for s in steps),
    "failed_step": failed or None,
    "machine": {"cpu_count": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
                "platform": platform.platform(), "os": os_release.get("PRETTY_NAME", "").strip('"'),
                "buildah": sh("buildah", "--version"), "podman": sh("podman", "--version"),
                "docker_engine": False},
    "base": {"tag": base, "made_by": "debootstrap --variant=minbase bookworm, then podman import",
             "reused": reused == "true", "id": inspect(base, "{{.Id}}")[:12] or None,
             "size_bytes": int(inspect(base, "{{.Size}}") or 0) or None},
    "image": {"tag": image, "id": inspect(image, "{{.Id}}")[:12] or None,
              "size_bytes": int(size) if size else None,
              "size_gib": round(int(size) / 2**30, 2) if size else None,
              "user": inspect(image, "{{.Config.User}}") or None},
    "commit": sh("git", "-C", f"{work}/context", "rev-parse", "HEAD") or None,
    "steps": steps,
    "total_seconds": round(sum(s["seconds"] for s in steps), 1),
}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(json.dumps({k: result[k] for k in ("ok", "failed_step", "image", "total_seconds")}, indent=2))
EOF
}

echo "check-image: $(date -u +%FT%TZ), HEAD $(git -C "$repo" rev-parse --short HEAD), work folder $work"
step install_tools install_tools
step base_image make_base
step build_context make_context
step pip_config make_pip_conf
step build build_image
podman images --filter reference="$image_tag" --filter reference="$base_tag"

in_image user 'id; echo "HOME=$HOME PWD=$PWD"; test "$(id -u)" = 1000 && test "$PWD" = /workspace && python --version && pip --version && python -c "import torch; print(torch.__version__)"'
in_image validate 'nice -n 10 qlora-rlhf validate'
in_image tests "nice -n 10 python -m pytest $pytest_args"
in_image smoke_dag 'cp configs/smoke.yaml params.yaml && nice -n 10 dvc repro \
  && test -s results/smoke/paper/macros.tex && test -s results/smoke/eval/summary.csv \
  && ls results/smoke/figures/*.png >/dev/null && { ! command -v latexmk >/dev/null || test -s results/smoke/paper/paper.pdf; } \
  && dvc repro 2>&1 | tee /tmp/noop.log && ! grep -q "Running stage" /tmp/noop.log && echo "second dvc repro: nothing to do"'
finish

if $remove; then
  cleanup
  podman rmi -f "$image_tag" "$base_tag" || true
  podman image prune -f >/dev/null || true   # the untagged intermediate layers --layers kept
  rm -rf "$work"
fi
