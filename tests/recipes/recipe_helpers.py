"""What the recipe tests share: a learnable chat data set, a run's Hydra config, a free port."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from hydra import compose, initialize_config_dir

from medusa_train.config import register_configs

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat and then the dog ran to the park with a red ball".split()

register_configs()


def write_counting_chats(path: Path, rows: int, words: int) -> Path:
    """Conversations whose answers follow a learnable pattern (counting words in a cycle)."""
    with open(path, "w") as f:
        for i in range(rows):
            answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the words from {i}."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_overrides(recipe: str, model_dir, data_file, out) -> list[str]:
    """The overrides every test run starts from: which recipe, model, data and folder, no logger."""
    return [f"+recipe={recipe}", f"model.name_or_path={model_dir}", f"data.sources=[{data_file}]",
            f"output_dir={out}", "logger=none"]


def compose_config(args: list[str]):
    """The config `python -m medusa_train <args>` would run."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
