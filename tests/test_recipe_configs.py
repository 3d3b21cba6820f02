"""Per-model recipes (recipes/<model>/*.yaml) and accelerate configs (recipes/accelerate_configs/).

Every recipe composes against the schema, its header's launch command and batch arithmetic
agree with its values, and every accelerate config loads with accelerate's own loader. The
DeepSpeed configs are built the way `accelerate launch` builds them (DeepSpeedPlugin), their
"auto" values filled from a recipe's batch settings; with deepspeed installed, deepspeed's
own config class validates them too (CI without deepspeed still runs the rest).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medusa_train.__main__ import RECIPES, _has_recipe
from medusa_train.config import register_configs
from medusa_train.training.distributed import fill_batch_settings

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml"))
RECIPE_FILES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate_configs")
# accelerate config keys that only the launcher reads (not DeepSpeedPlugin fields)
LAUNCHER_ONLY = {"deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_exclusion_filter",
                 "deepspeed_inclusion_filter"}

register_configs()


def compose_recipe(path: Path, overrides=()):
    """What `python -m medusa_train --config-dir <dir> --config-name <name>` composes."""
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
        return compose(config_name=path.stem, overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides])


def launch_args(command: str) -> tuple[str | None, int | None, list[str]]:
    """(accelerate config file, --num_processes, medusa_train args) of a header's command."""
    words = shlex.split(command)
    config_file = words[words.index("--config_file") + 1] if "--config_file" in words else None
    processes = int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else None
    return config_file, processes, words[words.index("medusa_train") + 1:]


def header(path: Path) -> str:
    """The leading comment block, continuation lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.sub(r"\s*\\\s+", " ", "\n".join(lines).replace("\\\n", "\\ "))


def test_there_are_per_model_recipes():
    folders = {p.parent.name for p in RECIPE_FILES}
    assert {"smollm2-135m", "llama-3-8b", "qwen2.5-7b", "llama-3-70b"} <= folders
    for folder in ("llama-3-8b", "qwen2.5-7b", "llama-3-70b"):
        assert {"medusa1.yaml", "medusa2.yaml"} <= {p.name for p in (ROOT / "recipes" / folder).glob("*.yaml")}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_composes_and_its_header_adds_up(path):
    cfg = compose_recipe(path)
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.recipe.name in RECIPES
    notes = cfg.notes
    assert notes is not None and {"launch", "accelerate_config", "hardware", "batch"} <= set(notes)

    # the header states the launch command, the hardware and the batch arithmetic of notes
    text = header(path)
    assert notes.launch in text, f"{path}: the header does not show {notes.launch!r}"
    assert f"Hardware: {notes.hardware}" in text
    b = notes.batch
    assert f"micro-batch {b.micro_batch_size} x {b.seq_len} tokens x accum {b.grad_accum_steps} x {b.processes} " \
           f"processes = {b.sequences_per_step} sequences, <= {b.tokens_per_step:,} tokens/step" in text

    # the arithmetic matches the config values and the accelerate config's process count
    config_file, processes_flag, args = launch_args(notes.launch)
    assert config_file == notes.accelerate_config
    if config_file is None:
        processes = 1
        assert notes.launch.startswith("python -m medusa_train")
    else:
        processes = processes_flag or load_config_from_file(str(ROOT / config_file)).num_processes
    assert b.micro_batch_size == cfg.train.micro_batch_size
    assert b.grad_accum_steps == cfg.train.grad_accum_steps
    assert b.seq_len == cfg.data.max_length
    assert b.processes == processes
    assert b.sequences_per_step == b.micro_batch_size * b.grad_accum_steps * b.processes
    assert b.tokens_per_step == b.sequences_per_step * b.seq_len

    # the command selects this very file
    assert args[:4] == ["--config-dir", f"recipes/{path.parent.name}", "--config-name", path.stem]
    assert _has_recipe(args)


def test_seventy_b_recipes_use_zero3():
    for path in (ROOT / "recipes" / "llama-3-70b").glob("*.yaml"):
        cfg = compose_recipe(path)
        ds = load_config_from_file(str(ROOT / cfg.notes.accelerate_config)).deepspeed_config
        assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] is True


def test_recipe_overrides_still_apply():
    cfg = compose_recipe(ROOT / "recipes/llama-3-8b/medusa1.yaml", ["train.max_steps=7", "heads.num_heads=3"])
    assert cfg.train.max_steps == 7 and cfg.heads.num_heads == 3
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"


def test_header_command_runs_on_the_command_line():
    """The README's selection mechanism end to end: --config-dir/--config-name through __main__."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "medusa_train", "--config-dir", "recipes/qwen2.5-7b",
                             "--config-name", "medusa2", "--cfg", "job"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert job["recipe"]["name"] == "medusa2" and job["model"]["name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert job["train"]["grad_accum_steps"] == 8


# ---- accelerate configs ----------------------------------------------------------------------------


def test_the_accelerate_configs_exist():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"cpu_ddp.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "multinode_zero3.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0
    assert f"--config_file recipes/accelerate_configs/{path.name}" in path.read_text()  # the header's command
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port
        assert "machine_rank" in path.read_text().split("compute_environment")[0]  # documented in the header
    if config.distributed_type.value == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["zero_stage"] in (2, 3)
        # batch settings belong to the recipes: DeepSpeed's values stay "auto"
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
        if ds["zero_stage"] == 3:
            assert ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True


def deepspeed_plugin_config(path: Path, mixed_precision: str) -> dict:
    """The DeepSpeed config `accelerate launch --config_file path` gives the engine, before the recipe fills it."""
    from accelerate.utils import DeepSpeedPlugin

    config = load_config_from_file(str(path))
    fields = {k: v for k, v in config.deepspeed_config.items() if k not in LAUNCHER_ONLY}
    plugin = DeepSpeedPlugin(**fields)
    plugin.set_mixed_precision(mixed_precision)
    return plugin.deepspeed_config


DEEPSPEED_CONFIGS = [p for p in ACCELERATE_CONFIGS if "DEEPSPEED" in p.read_text()]


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_fills_from_the_recipe(path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    ds = deepspeed_plugin_config(path, load_config_from_file(str(path)).mixed_precision)
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    fill_batch_settings(ds, micro_batch_size=4, grad_accum_steps=8, processes=8, max_grad_norm=1.0)
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 8 and ds["gradient_clipping"] == 1.0
    assert "auto" not in yaml.safe_dump(ds)
    assert ds["bf16"]["enabled"] is True


def test_explicit_deepspeed_values_must_agree_with_the_recipe():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        fill_batch_settings(config, micro_batch_size=4, grad_accum_steps=8, processes=1, max_grad_norm=1.0)
    ok = fill_batch_settings({"gradient_accumulation_steps": 8}, 4, 8, 2, 1.0)
    assert ok["train_batch_size"] == 64


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts_the_config(path, monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    ds = deepspeed_plugin_config(path, "bf16")
    fill_batch_settings(ds, micro_batch_size=4, grad_accum_steps=8, processes=1, max_grad_norm=1.0)  # 1 process here
    checked = DeepSpeedConfig(ds)
    assert checked.zero_optimization_stage == load_config_from_file(str(path)).deepspeed_config["zero_stage"]
    assert checked.train_batch_size == 32 and checked.gradient_clipping == 1.0 and checked.bfloat16_config.enabled
    if checked.zero_optimization_stage == 3:
        assert checked.zero_config.gather_16bit_weights_on_model_save

    broken = {**ds, "zero_optimization": {**ds["zero_optimization"], "stagee": 3}}
    with pytest.raises(Exception, match="stagee"):
        DeepSpeedConfig(broken)
