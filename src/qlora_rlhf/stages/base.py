from ..config import Config
from ..models import run_base
from ..paths import RunPaths


def run(config: Config, paths: RunPaths) -> None:
    print(f"base: wrote {run_base(config, paths)}")
