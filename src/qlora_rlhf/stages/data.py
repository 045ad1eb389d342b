from .. import data
from ..config import Config
from ..models import load_tokenizer
from ..paths import RunPaths


def run(config: Config, paths: RunPaths) -> None:
    tokenizer = load_tokenizer(config.model.name_or_path)  # lengths are counted in the model's tokens
    manifest = data.run(config, paths, tokenizer)
    sizes = ", ".join(f"{name}={info['rows']}" for name, info in manifest["subsets"].items())
    dropped = {split: sum(c.values()) for split, c in manifest["dropped"].items()}
    print(f"data: wrote {paths.data} ({sizes}); dropped rows: {dropped}")
