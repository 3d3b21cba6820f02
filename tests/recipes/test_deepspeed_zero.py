"""DeepSpeed ZeRO in the recipes: the plain path's helpers, and real ZeRO-2/3 runs on the CPU.

The runs use DeepSpeed's CPU accelerator over gloo (tests/recipes/deepspeed_cpu_entry.py)
with 2 processes and the repo's zero2.yaml / zero3.yaml (num_processes and precision set
for the CPU), and must match a 1-process plain run with the same global batch; ZeRO-3 is
also killed (stop_after_steps) and resumed from its sharded checkpoint. They need
deepspeed (pip install -e '.[deepspeed]') and are skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from medusa_train.heads import MedusaHeads, MedusaHeadsConfig
from medusa_train.recipes import medusa1, medusa2
from medusa_train.training.checkpoint import latest_checkpoint, read_state, save_checkpoint_dir
from medusa_train.training.distributed import (
    compute_dtype,
    grad_norm_value,
    is_deepspeed,
    loss_scale,
    save_heads,
    zero_stage,
)
from medusa_train.training.row_shards import length_batches
from tests.recipes.recipe_helpers import ROOT, compose_config, free_port, run_overrides, write_counting_chats


def fake_accelerator(kind=DistributedType.NO, processes=1, stage=None):
    config = {"zero_optimization": {"stage": stage}} if stage is not None else {}
    return SimpleNamespace(distributed_type=kind, num_processes=processes, is_main_process=True,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


# ---- the plain path is unchanged -------------------------------------------------------------------


def test_plain_path_helpers_keep_the_plain_answers():
    plain = fake_accelerator(DistributedType.MULTI_GPU, processes=4)
    ds = fake_accelerator(DistributedType.DEEPSPEED, processes=4, stage=3)
    assert not is_deepspeed(plain) and zero_stage(plain) is None
    assert loss_scale(plain, accum=8) == 4  # DDP averages over processes only
    assert loss_scale(ds, accum=8) == 32  # DeepSpeed also divides by the accumulation steps
    assert zero_stage(ds) == 3
    assert compute_dtype(plain, torch.nn.Linear(2, 2)) is None
    assert compute_dtype(ds, torch.nn.Linear(2, 2).bfloat16()) == torch.bfloat16
    assert grad_norm_value(None) == 0.0 and grad_norm_value(torch.tensor(2.5)) == 2.5


def test_heads_save_the_same_files_on_both_paths(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=8, vocab_size=32, num_heads=2, truncated_vocab_size=4))
    heads.init_from_base(torch.nn.Linear(8, 32, bias=False), torch.tensor([1, 5, 7, 9]))
    save_heads(fake_accelerator(), heads, tmp_path / "plain")
    save_heads(fake_accelerator(DistributedType.DEEPSPEED, stage=2), heads, tmp_path / "ds")
    a, b = load_file(str(tmp_path / "plain/medusa_heads.safetensors")), load_file(str(tmp_path / "ds/medusa_heads.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert (tmp_path / "plain/medusa_heads.json").read_text() == (tmp_path / "ds/medusa_heads.json").read_text()


def test_checkpoint_in_two_phases_is_a_checkpoint(tmp_path):
    from medusa_train.training.checkpoint import begin_checkpoint, finish_checkpoint

    tmp = begin_checkpoint(tmp_path, 3)
    (tmp / "engine").mkdir()
    assert latest_checkpoint(tmp_path) is None  # invisible until finished
    finish_checkpoint(tmp_path, 3, tmp, {"losses": [1.0]}, keep=1)
    save_checkpoint_dir(tmp_path, 5, lambda folder: (folder / "x").write_text("x"), {"losses": []}, keep=1)
    assert latest_checkpoint(tmp_path).name == "step_5" and not (tmp_path / "step_3").exists()
    assert read_state(tmp_path / "step_5")["step"] == 5


def test_hidden_cache_batches_cover_every_row_once():
    lengths = [5, 90, 30, 30, 7, 64, 1]
    batches = length_batches(lengths, batch_tokens=100)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    assert all(max(lengths[j] for j in b) * len(b) <= 100 or len(b) == 1 for b in batches)


def test_cli_takes_a_recipe_file_instead_of_plus_recipe():
    from medusa_train.__main__ import _has_recipe

    assert _has_recipe(["--config-dir", "recipes/llama-3-8b", "--config-name", "medusa1"])
    assert _has_recipe(["+recipe=medusa1"]) and not _has_recipe(["train.max_steps=3"])


# ---- real DeepSpeed runs on the CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_chat_file(tmp_path_factory):
    return write_counting_chats(tmp_path_factory.mktemp("ds_data") / "chat.jsonl", rows=48, words=40)


def cpu_config(name: str, tmp_path: Path) -> Path:
    """The repo's accelerate config, resized for 2 CPU processes in fp32."""
    config = yaml.safe_load((ROOT / "recipes/accelerate_configs" / name).read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_ip="127.0.0.1", main_process_port=free_port())
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             str(ROOT / "tests/recipes/deepspeed_cpu_entry.py"), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def run_plain(args: list[str]) -> dict:
    cfg = compose_config(args)
    return {"medusa1": medusa1, "medusa2": medusa2}[cfg.recipe.name].main(cfg)


def medusa1_args(model_dir, data_file, out, *extra):
    return [*run_overrides("medusa1", model_dir, data_file, out), "data.max_length=96", "data.eval_fraction=0.2",
            "train.max_steps=6", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=3", "train.save_every=4",
            "train.log_every=1", "heads.num_heads=2", "train.hidden_cache_dtype=float32", "train.grad_accum_steps=2",
            *extra]


def assert_same_run(one: Path, two: Path, loss_key="train_loss"):
    s1 = json.loads((one / "train_summary.json").read_text())
    s2 = json.loads((two / "train_summary.json").read_text())
    assert s2[loss_key] == pytest.approx(s1[loss_key], rel=1e-4)
    assert s2["eval_final"] == s1["eval_final"] or s2["eval_final"]["top5"] == pytest.approx(s1["eval_final"]["top5"])
    a, b = load_file(str(one / "heads/medusa_heads.safetensors")), load_file(str(two / "heads/medusa_heads.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == a[name].dtype
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_zero2_two_processes_match_one_plain_process(tiny_model_dir, ds_chat_file, tmp_path):
    pytest.importorskip("deepspeed")
    run_plain(medusa1_args(tiny_model_dir, ds_chat_file, tmp_path / "one", "train.micro_batch_size=4",
                           "heads.truncated_vocab_size=null"))
    launch(cpu_config("zero2.yaml", tmp_path), medusa1_args(tiny_model_dir, ds_chat_file, tmp_path / "two",
                                                            "train.micro_batch_size=2", "heads.truncated_vocab_size=null"))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two/step_4/engine/pytorch_model").is_dir()  # accelerate.save_state, optimizer shards
    assert len(list((tmp_path / "two/hidden_cache/train").glob("shard*_index.npy"))) == 2


def test_zero3_resumes_from_sharded_state_and_matches_one_plain_process(tiny_model_dir, ds_chat_file, tmp_path):
    """Frozen backbone + heads as one ZeRO-3 module (zero3_init_flag), heads projecting with a
    truncated slice of the partitioned base lm_head; killed after 4 steps and resumed."""
    pytest.importorskip("deepspeed")
    run_plain(medusa1_args(tiny_model_dir, ds_chat_file, tmp_path / "one", "train.micro_batch_size=4",
                           "heads.truncated_vocab_size=64"))
    config = cpu_config("zero3.yaml", tmp_path)
    args = medusa1_args(tiny_model_dir, ds_chat_file, tmp_path / "two", "train.micro_batch_size=2",
                        "heads.truncated_vocab_size=64")
    launch(config, [*args, "train.stop_after_steps=4"])
    shards = sorted(p.name for p in (tmp_path / "two/step_4/engine/pytorch_model").iterdir())
    assert [n for n in shards if "optim_states" in n] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (tmp_path / "two/heads").exists()
    resumed = launch(config, [*args, "resume=true"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_medusa2_lora_under_zero3_matches_one_plain_process(tiny_model_dir, ds_chat_file, tmp_path):
    pytest.importorskip("deepspeed")
    common = ["+recipe=medusa2", f"model.name_or_path={tiny_model_dir}", "model.dtype=float32",
              f"data.sources=[{ds_chat_file}]", "logger=none", "data.max_length=96", "data.eval_fraction=0.2",
              "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=1000", "train.save_every=1000",
              "heads.num_heads=2", "heads.truncated_vocab_size=null", "train.hidden_cache_dtype=float32",
              "medusa2.lora_r=4", "medusa2.stage1_max_steps=2", "train.grad_accum_steps=2", "medusa2.lora_dropout=0.0"]
    run_plain([*common, f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4"])
    launch(cpu_config("zero3.yaml", tmp_path), [*common, f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2"])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    a = load_file(str(tmp_path / "one/backbone/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two/backbone/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(b[k].numel() == a[k].numel() for k in a)  # gathered, not partitions
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
