"""The bundled data in data/: readable without skips, MT-bench kept out, licenses recorded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from medusa_train.data import load_conversations
from medusa_train.data.readers import repo_root

DATA = repo_root() / "data"
SHARED = repo_root().parent / "shared" / "data"


def mt_bench_turns() -> set[str]:
    rows = [json.loads(line) for line in (DATA / "mt_bench_question.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)
    return {turn.strip() for r in rows for turn in r["turns"]}


def test_default_train_reads_cleanly_and_is_a_mix(caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_conversations(["data/default_train.jsonl"])
    assert not caplog.records
    assert 2000 <= len(ds) <= 4000
    assert len(set(ds["source"])) >= 5
    user_texts = {m["content"] for chat in ds["messages"] for m in chat if m["role"] == "user"}
    assert not user_texts & mt_bench_turns()


def test_default_train_replies_start_within_the_default_max_length(smol_tokenizer):
    """No row is dropped at max_length=512: every first reply starts well inside the window."""
    chats = load_conversations(["data/default_train.jsonl"])["messages"]
    first_reply = [next(i for i, m in enumerate(chat) if m["role"] == "assistant") for chat in chats]
    prompts = [smol_tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
               for chat, i in zip(chats, first_reply)]
    lengths = [len(ids) for ids in smol_tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    assert max(lengths) < 480


def test_default_prompts_are_prompt_only():
    ds = load_conversations(["data/default_prompts.jsonl"], require_assistant=False)
    assert len(ds) >= 500
    assert all(len(chat) == 1 and chat[0]["role"] == "user" for chat in ds["messages"])
    assert not {chat[0]["content"] for chat in ds["messages"]} & mt_bench_turns()


def test_sources_and_licenses_are_recorded():
    sources = (DATA / "SOURCES.md").read_text()
    for path in DATA.glob("*.jsonl"):
        assert f"`{path.name}`" in sources
    for license_file in ["Apache-2.0.txt", "MIT-GPTeacher.txt", "MIT-GSM8K.txt"]:
        assert (DATA / "LICENSES" / license_file).is_file() and f"LICENSES/{license_file}" in sources
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 10_000_000


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared source files next to the checkout")
def test_prepare_default_reproduces_the_bundled_files(tmp_path):
    subprocess.run([sys.executable, str(DATA / "prepare_default.py"), "--src", str(SHARED), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ["default_train.jsonl", "default_prompts.jsonl", "mt_bench_question.jsonl"]:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_default_self_distill_is_the_models_answers_to_bundled_prompts():
    from medusa_train.data.self_distill import answers_model

    path = DATA / "default_self_distill.jsonl"
    assert answers_model(path) == "smollm2-135m-instruct"  # what the recipes' other-model warning reads
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 600 and len(load_conversations([str(path)])) == 600
    source = load_conversations(["data/default_train.jsonl"], require_assistant=False)["messages"]
    for row in rows[::50]:  # each prompt is the first user turn of the source row it names
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["messages"][1]["content"]
        assert row["messages"][0]["content"] == next(m["content"] for m in source[row["id"]] if m["role"] == "user")
