"""Medusa-1 end to end on a tiny random Llama with SmolLM2's tokenizer (seconds, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medusa_train.recipes import medusa1
from tests.recipes.recipe_helpers import ROOT, compose_config, free_port, run_overrides, write_counting_chats


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_counting_chats(tmp_path_factory.mktemp("data") / "chat.jsonl", rows=48, words=40)


def overrides(model_dir, data_file, out, *extra):
    return [
        *run_overrides("medusa1", model_dir, data_file, out), "data.max_length=96", "data.eval_fraction=0.2",
        "train.micro_batch_size=4", "train.max_steps=12", "train.warmup_steps=2", "train.lr=3e-3",
        "train.eval_every=1000", "train.save_every=4", "train.log_every=1", "heads.num_heads=2",
        "heads.truncated_vocab_size=null", *extra,
    ]


def run_in_process(args):
    return medusa1.main(compose_config(args))


def heads_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "heads" / "medusa_heads.safetensors"))


def test_training_lowers_loss_and_beats_untrained_heads(tiny_model_dir, chat_file, tmp_path):
    # Own projections: a random tiny model's tied lm_head is too small-scaled for a
    # shared projection to become confident in 12 steps.
    summary = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "run", "heads.lm_head=own", "train.lr=3e-2"))
    losses = summary["train_loss"]
    assert losses[-1] < 0.3 * losses[0]
    assert summary["eval_final"]["top1"][0] > summary["eval_untrained"]["top1"][0] + 0.3
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert saved["steps"] == 12 and Path(saved["heads_dir"]).is_dir()


def test_hidden_cache_gives_the_same_training(tiny_model_dir, chat_file, tmp_path):
    extra = ["train.max_steps=4", "train.hidden_cache_dtype=float32"]
    cached = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "a", "train.hidden_cache=true", *extra))
    direct = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "b", "train.hidden_cache=false", *extra))
    assert cached["train_loss"] == pytest.approx(direct["train_loss"], rel=1e-4)
    assert (tmp_path / "a" / "hidden_cache" / "train" / "meta.json").is_file()


def test_existing_run_is_not_overwritten_silently(tiny_model_dir, chat_file, tmp_path):
    args = overrides(tiny_model_dir, chat_file, tmp_path / "run", "train.max_steps=2")
    run_in_process(args)
    with pytest.raises(FileExistsError, match="resume=true"):
        run_in_process(args)
    run_in_process(args + ["overwrite=true"])


def test_nan_loss_stops_naming_the_step(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    real = medusa1.medusa_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, ce, counts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), ce * float("nan"), counts) if calls["n"] == 3 else (loss, ce, counts)

    monkeypatch.setattr(medusa1, "medusa_loss", poisoned)
    with pytest.raises(medusa1.NonFiniteLossError, match="at step 3"):
        run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "stop"))
    calls["n"] = 0
    summary = run_in_process(overrides(tiny_model_dir, chat_file, tmp_path / "skip", "train.on_nan=skip"))
    assert summary["skipped_batches"] == 1
    assert all(torch.isfinite(w).all() for w in heads_weights(tmp_path / "skip").values())


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medusa_train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, chat_file, tmp_path):
    full = _cli(overrides(tiny_model_dir, chat_file, tmp_path / "full"))
    killed = _cli(overrides(tiny_model_dir, chat_file, tmp_path / "killed"))
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "step_8" / "trainer_state.json").exists():
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "heads").exists()
    resumed = _cli(overrides(tiny_model_dir, chat_file, tmp_path / "killed", "resume=true"))
    out_resumed, _ = resumed.communicate(timeout=240)
    out_full, _ = full.communicate(timeout=240)
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    assert "resumed from" in out_resumed
    a, b = heads_weights(tmp_path / "full"), heads_weights(tmp_path / "killed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, chat_file, tmp_path):
    common = ["train.max_steps=6", "train.hidden_cache_dtype=float32"]
    one = _cli(overrides(tiny_model_dir, chat_file, tmp_path / "one", "train.micro_batch_size=4", *common))
    out_one, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out_one
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes/accelerate_configs/cpu_ddp.yaml"), "--main_process_port", str(free_port()),
         "-m", "medusa_train", *overrides(tiny_model_dir, chat_file, tmp_path / "two", "train.micro_batch_size=2", *common)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    s1 = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert s2["train_loss"] == pytest.approx(s1["train_loss"], rel=1e-4)
    assert s2["eval_final"]["tokens"] == s1["eval_final"]["tokens"]
    a, b = heads_weights(tmp_path / "one"), heads_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "two" / "hidden_cache" / "train").glob("shard*_index.npy"))) == 2


def test_wandb_logs_offline_without_a_key(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in overrides(tiny_model_dir, chat_file, tmp_path / "wb", "train.max_steps=2") if a != "logger=none"]
    run_in_process(args + ["logger=wandb"])
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run was written"
