"""Readers: every row shape -> messages, detection, mixed sources, bad files, paths, hub ids."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest

from medusa_train.data import DataError, load_conversations, resolve_data_path
from medusa_train.data.formats import detect_format
from medusa_train.data.readers import repo_root


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def skip_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "medusa_train.data.skips"]


# ---- one reader per shape --------------------------------------------------------------

def test_sharegpt(write):
    path = write("chat.json", [
        {"id": "a", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": " Hi? "},
            {"from": "gpt", "value": "Hello.\n"},
            {"from": "user", "value": "Again"},
            {"from": "chatgpt", "value": "Hello again."},
        ]},
        {"id": "b", "conversations": [
            {"from": "bard", "value": "leading reply, answers nothing"},
            {"from": "human", "value": "Q"},
            {"from": "bing", "value": "A"},
        ]},
    ])
    ds = load_conversations([path])
    assert ds.column_names == ["messages", "source"]
    assert ds[0]["messages"] == [{"role": "system", "content": "Be brief."}, user("Hi?"), assistant("Hello."),
                                 user("Again"), assistant("Hello again.")]
    assert ds[1]["messages"] == [user("Q"), assistant("A")]  # the leading assistant turn is dropped
    assert ds["source"] == [path, path]


def test_messages(write):
    path = write("chat.jsonl", [{"messages": [user("2+2?"), assistant("4")]}])
    assert load_conversations([path])["messages"] == [[user("2+2?"), assistant("4")]]


def test_instruction_alpaca_and_gpteacher(write):
    alpaca = write("alpaca.json", [
        {"instruction": "Add.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ])
    gpteacher = write("gpteacher.json", [{"instruction": "Name a color.", "input": "", "response": "Red"}])
    assert load_conversations([alpaca])["messages"] == [[user("Add.\n\n2, 3"), assistant("5")],
                                                        [user("Say hi."), assistant("hi")]]
    assert load_conversations([gpteacher])["messages"] == [[user("Name a color."), assistant("Red")]]


def test_selfinstruct_gives_one_conversation_per_instance(write):
    path = write("seed.jsonl", [{"id": "t0", "instruction": "Antonym?", "is_classification": False, "instances": [
        {"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}])
    assert load_conversations([path])["messages"] == [[user("Antonym?\n\nhot"), assistant("cold")],
                                                      [user("Antonym?\n\nup"), assistant("down")]]


def test_qa(write):
    path = write("gsm.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    assert load_conversations([path])["messages"] == [[user("1+1?"), assistant("2\n#### 2")]]


def test_prompt_completion(write):
    path = write("t0.jsonl", [{"prompt": "Summarise: x", "completion": " x."}])
    assert load_conversations([path])["messages"] == [[user("Summarise: x"), assistant("x.")]]


def test_prompt_only_files(write, caplog):
    strings = write("oasst.jsonl", ["Why is the sky blue?", "Tell a joke."])  # one JSON string a line
    objects = write("prompts.jsonl", [{"prompt": "Why?"}])
    ds = load_conversations([strings, objects], require_assistant=False)
    assert ds["messages"] == [[user("Why is the sky blue?")], [user("Tell a joke.")], [user("Why?")]]
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="no usable conversations.*prompt-only"):
        load_conversations([strings])  # training needs an assistant turn
    assert "2 no assistant turn" in skip_warnings(caplog)[0]


def test_instruction_without_output_is_prompt_only(write):
    path = write("instr.jsonl", [{"instruction": "Write a poem."}])
    assert load_conversations([path], require_assistant=False)["messages"] == [[user("Write a poem.")]]


# ---- detection, override, mixing -------------------------------------------------------

@pytest.mark.parametrize("columns, fmt", [
    (["id", "conversations"], "sharegpt"),
    (["messages", "conversations"], "messages"),
    (["instruction", "input", "output"], "instruction"),
    (["instruction", "instances", "id"], "instruction"),
    (["question", "answer"], "qa"),
    (["prompt", "completion"], "completion"),
    (["prompt"], "prompt"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, "f") == fmt


def test_undetectable_format_names_file_and_columns(write):
    path = write("odd.jsonl", [{"turns": ["a"], "category": "x"}])
    with pytest.raises(DataError, match=r"odd\.jsonl.*\['category', 'turns'\]"):
        load_conversations([path])


def test_explicit_format_overrides_detection(write):
    path = write("both.jsonl", [{"question": "q", "answer": "a", "prompt": "p", "completion": "c"}])
    assert load_conversations([path])["messages"] == [[user("q"), assistant("a")]]
    assert load_conversations([path], format="completion")["messages"] == [[user("p"), assistant("c")]]
    with pytest.raises(DataError, match=r"both\.jsonl.*format 'sharegpt' needs column"):
        load_conversations([path], format="sharegpt")
    with pytest.raises(ValueError, match="unknown data format"):
        load_conversations([path], format="alpaca")


def test_mixed_sources_keep_their_source(write):
    chat = write("chat.json", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}])
    qa = write("qa.jsonl", [{"question": "c", "answer": "d"}, {"question": "e", "answer": "f", "source": "mine"}])
    ds = load_conversations([chat, qa])
    assert ds["messages"] == [[user("a"), assistant("b")], [user("c"), assistant("d")], [user("e"), assistant("f")]]
    assert ds["source"] == [chat, qa, "mine"]  # a row's own source field wins


def test_max_rows_per_source(write):
    a = write("a.jsonl", [{"question": f"q{i}", "answer": "x"} for i in range(5)])
    b = write("b.jsonl", ["p1", "p2", "p3"])
    ds = load_conversations([a, b], max_rows=2, require_assistant=False)
    assert [m[0]["content"] for m in ds["messages"]] == ["q0", "q1", "p1", "p2"]


# ---- unusable rows and bad files -------------------------------------------------------

def test_unusable_rows_are_skipped_with_one_warning(write, caplog):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    rows = [
        good,
        {"conversations": []},  # row 2: empty
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]},  # row 3
        {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "yo"}]},  # row 4
        {"conversations": "oops"},  # row 5: wrong type
        {"conversations": [{"from": "human", "value": "only a question"}]},  # row 6: no assistant
        {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "yo"}]},  # row 7: empty
        {"conversations": [{"from": "gpt", "value": "unprompted"}]},  # row 8: no user turn
        good,
    ]
    path = write("messy.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = load_conversations([path])
    assert len(ds) == 2
    (message,) = skip_warnings(caplog)
    assert message.startswith(f"{path}: skipped 7 of 9 rows: ")
    assert "2 empty (row 2; row 7: conversations[0].value)" in message
    assert "1 unknown role (row 3: 'robot' in conversations[1].from)" in message
    assert "1 non-string content (row 4: conversations[0].value is int)" in message
    assert "1 wrong type (row 5: conversations is str, expected a list)" in message
    assert "1 no assistant turn (row 6)" in message
    assert "1 no user turn (row 8)" in message


def test_skips_in_a_file_pyarrow_reads(write, caplog):
    """Same types in every row: the datasets loader reads it, the map path does the skipping."""
    rows = [{"messages": [user("q"), assistant("a")]}] * 3 + [{"messages": [user("q"), {"role": "robot",
                                                                                         "content": "a"}]}]
    path = write("arrow.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = load_conversations([path])
    assert len(ds) == 3
    (message,) = skip_warnings(caplog)
    assert message == f"{path}: skipped 1 of 4 rows: 1 unknown role (row 4: 'robot' in messages[1].role)"


def test_bad_jsonl_names_file_and_line(write):
    path = write("bad.jsonl", '{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_conversations([path])


def test_bad_json_array_names_file_and_line(write):
    path = write("bad.json", '[\n {"question": "a", "answer": "b"},\n {"question": "c",, "answer": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 3"):
        load_conversations([path])


def test_empty_file(write):
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        load_conversations([write("empty.jsonl", "")])


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'data/nope\.jsonl' not found"):
        load_conversations(["data/nope.jsonl"])


# ---- paths and hub ids -----------------------------------------------------------------

def test_relative_paths_try_cwd_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/SOURCES.md") == repo_root() / "data" / "SOURCES.md"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "SOURCES.md").write_text("mine")
    assert resolve_data_path("data/SOURCES.md") == tmp_path / "data" / "SOURCES.md"


def test_other_strings_are_hub_ids(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_conversations(["openai/gsm8k:main"], split="train", max_rows=5)
    assert calls == [("openai/gsm8k", "main", "train[:5]")]
    assert ds[0] == {"messages": [user("q"), assistant("a")], "source": "openai/gsm8k:main"}


def test_unloadable_hub_id_says_what_was_tried(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'someone/chats': no such local file.*ConnectionError: no network"):
        load_conversations(["someone/chats"])


def test_repo_root_holds_pyproject():
    assert (repo_root() / "pyproject.toml").is_file()
    assert Path(resolve_data_path("pyproject.toml")).is_file()
