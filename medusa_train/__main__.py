"""python -m medusa_train +recipe=<name> [overrides]: compose the config, run the recipe.

Recipes live in medusa_train/recipes/<name>.py and expose `main(cfg)`. A per-model recipe
file (recipes/<model>/<method>.yaml) is the primary config instead:
    python -m medusa_train --config-dir recipes/smollm2-135m --config-name medusa1 [overrides]
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medusa_train.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    recipe = importlib.import_module(f"medusa_train.recipes.{cfg.recipe.name}")
    recipe.main(cfg)


def _has_recipe(argv: list[str]) -> bool:
    """+recipe=<name>, or a per-model recipe file chosen with --config-name (it names its recipe)."""
    return any(a.split("=")[0].lstrip("+") == "recipe" for a in argv) or any(
        a.startswith(("--help", "-h", "--cfg", "--info", "-c", "--hydra-help", "--config-name", "-cn")) for a in argv
    )


if __name__ == "__main__":
    if not _has_recipe(sys.argv[1:]):
        sys.exit(f"choose a recipe: python -m medusa_train +recipe=<{'|'.join(RECIPES)}> [key=value ...], or a "
                 "per-model one: python -m medusa_train --config-dir recipes/<model> --config-name <method>")
    main()
