"""The README's command on the real default model, shortened: python -m medusa_train +recipe=medusa1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "medusa_train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_a_recipe_the_cli_says_how_to_choose_one():
    result = run_cli()
    assert result.returncode != 0
    assert "+recipe=<" in result.stderr and "medusa1" in result.stderr


def test_default_medusa1_on_smollm2_short(tmp_path):
    out = tmp_path / "run"
    result = run_cli("+recipe=medusa1", f"output_dir={out}", "logger=none", "train.max_steps=6",
                     "train.micro_batch_size=2", "data.max_rows=200", "data.eval_max_rows=8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "heads saved to" in result.stdout and "head  top-1" in result.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["base_model"] == "smollm2-135m-instruct" and summary["steps"] == 6
    heads = json.loads((out / "heads" / "medusa_heads.json").read_text())
    assert heads["num_heads"] == 4 and heads["hidden_size"] == 576 and heads["vocab_size"] == 49152
    assert heads["truncated_vocab_size"] == 8192
    assert (out / ".hydra" / "config.yaml").is_file()
