"""The self_distill recipe end to end on a tiny random Llama with SmolLM2's tokenizer (CPU).

One uninterrupted greedy run in-process is the reference; a run killed with SIGKILL and
resumed, and a 2-process accelerate run, must write the very same file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir

from medusa_train.config import register_configs
from medusa_train.data import load_conversations
from medusa_train.data.self_distill import (
    SettingsMismatchError,
    meta_file,
    part_file,
    part_files,
    read_jsonl,
)
from medusa_train.recipes import self_distill

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
NUM_ROWS = 16
register_configs()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Prompt-only rows and multi-turn conversations whose dataset answers must be replaced."""
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(NUM_ROWS):
            messages = [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 7)}]
            if i % 4 == 0:
                messages += [{"role": "assistant", "content": "A DATASET ANSWER"},
                             {"role": "user", "content": f"Follow-up {i}?"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Keep the datasets cache of these tiny files out of ~/.cache."""
    path = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", path)
        yield path


def overrides(model_dir, data_file, out, *extra):
    return ["+recipe=self_distill", f"model.name_or_path={model_dir}", f"data.sources=[{data_file}]",
            f"output_dir={out}", "self_distill.max_new_tokens=8", "self_distill.batch_size=4",
            "self_distill.chunk_size=3", *extra]


def run_in_process(args):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    return self_distill.main(cfg)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data_file, hf_cache, tmp_path_factory):
    """An uninterrupted one-process greedy run: (summary, rows)."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_in_process(overrides(tiny_model_dir, data_file, out))
    return summary, list(read_jsonl(out / "self_distill.jsonl"))


def _cli(args, hf_cache, launcher=(sys.executable,), **env):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(hf_cache), **env}
    return subprocess.Popen([*launcher, "-m", "medusa_train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_reference_run_answers_every_user_turn(reference, tmp_path):
    summary, rows = reference
    assert [r["id"] for r in rows] == list(range(NUM_ROWS))
    assert summary["answers"] == NUM_ROWS + NUM_ROWS // 4 and summary["tokens"] == 8 * summary["answers"]
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == (["user", "assistant"] * (2 if r["id"] % 4 == 0 else 1))
        assert "A DATASET ANSWER" not in json.dumps(r) and r["truncated"] is True
    meta = json.loads(meta_file(Path(summary["output_file"])).read_text())
    assert meta["settings"]["max_new_tokens"] == 8 and meta["runs"][0]["answers"] == summary["answers"]
    # The training recipes read it back as conversations.
    assert load_conversations([summary["output_file"]])["messages"] == [r["messages"] for r in rows]


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, data_file, hf_cache, reference, tmp_path,
                                                     caplog, capsys):
    out = tmp_path / "run"
    output_file, part = out / "self_distill.jsonl", part_file(out / "self_distill.jsonl", 0)
    killed = _cli(overrides(tiny_model_dir, data_file, out), hf_cache)
    deadline = time.time() + 120
    while _lines(part) < 2:  # some conversations written, most still to come
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    written = _lines(part)
    assert 2 <= written < NUM_ROWS and not output_file.exists()
    with open(part, "a") as f:
        f.write('{"id": 999, "messages": [{"role": "us')  # what a kill mid-append leaves behind

    with pytest.raises(FileExistsError, match="resume=true"):  # refuses to start over silently
        run_in_process(overrides(tiny_model_dir, data_file, out))
    with caplog.at_level(logging.WARNING):  # a fresh main() is a restart; in-process saves an interpreter start
        run_in_process(overrides(tiny_model_dir, data_file, out, "resume=true"))
    assert "dropped a half-written last row" in caplog.text
    assert f"{written} of {NUM_ROWS} conversations already answered" in capsys.readouterr().out
    rows = list(read_jsonl(output_file))
    assert [r["id"] for r in rows] == list(range(NUM_ROWS))  # all there, no duplicates, torn row gone
    assert rows == reference[1]
    assert part_files(output_file) == []
    runs = json.loads(meta_file(output_file).read_text())["runs"]
    assert len(runs) == 1 and runs[0]["conversations"] == NUM_ROWS - written  # the killed run never finished


def test_resume_with_other_settings_is_refused(tiny_model_dir, data_file, reference, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    src = Path(reference[0]["output_file"])
    for p in (src, meta_file(src)):
        shutil.copy(p, out / p.name)
    with pytest.raises(SettingsMismatchError, match=r"max_new_tokens: 8 in the file, 9 now"):
        run_in_process(overrides(tiny_model_dir, data_file, out, "resume=true", "self_distill.max_new_tokens=9"))
    before = (out / src.name).read_bytes()
    summary = run_in_process(overrides(tiny_model_dir, data_file, out, "resume=true"))  # complete: nothing to do
    assert summary["conversations"] == 0 and (out / src.name).read_bytes() == before


def test_two_processes_write_the_same_file_as_one(tiny_model_dir, data_file, hf_cache, reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "recipes/accelerate_configs/cpu_ddp.yaml"), "--main_process_port", str(port)]
    out = tmp_path / "ddp"
    proc = _cli(overrides(tiny_model_dir, data_file, out), hf_cache, launcher=launcher)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    output_file = out / "self_distill.jsonl"
    assert list(read_jsonl(output_file)) == reference[1]
    assert part_files(output_file) == []
    [run] = json.loads(meta_file(output_file).read_text())["runs"]
    assert run["processes"] == 2 and run["conversations"] == NUM_ROWS and run["answers"] == reference[0]["answers"]


def test_training_on_another_models_answers_warns(tmp_path):
    from medusa_train.data.self_distill import answers_model, meta_file, warn_other_models_answers, write_meta

    data = tmp_path / "answers.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    assert answers_model(data) is None and warn_other_models_answers([str(data)], "m") == []
    write_meta(data, {"settings": {"base_model": "smollm2-135m-instruct"}, "info": {}, "runs": []})
    assert meta_file(data).is_file() and answers_model(data) == "smollm2-135m-instruct"
    assert warn_other_models_answers([str(data)], "smollm2-135m-instruct") == []
    (warning,) = warn_other_models_answers([str(data), "some/hub-dataset"], "Qwen/Qwen2.5-0.5B-Instruct")
    assert "answers of smollm2-135m-instruct, not of Qwen/Qwen2.5-0.5B-Instruct" in warning
