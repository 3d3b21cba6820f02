"""Self-distillation generation and its resumable writer, on a tiny random Llama (fp32)."""

from __future__ import annotations

import pytest
import torch

from medusa_train.base_model import load_base_model, load_tokenizer
from medusa_train.data.self_distill import (
    SettingsMismatchError,
    answered_ids,
    append_jsonl,
    check_settings,
    distill_conversations,
    generate_answers,
    merge_parts,
    meta_file,
    part_file,
    part_files,
    prompt_ids,
    read_jsonl,
    repair_jsonl,
    write_meta,
)

PROMPTS = [[{"role": "user", "content": "hi " * n}] for n in (1, 9, 3, 20, 6)]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    # One thread: tiny matmuls are fastest so, and two spin-wait badly on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_base_model(str(tiny_model_dir), dtype="float32"), load_tokenizer(str(tiny_model_dir))
    torch.set_num_threads(threads)


def test_batched_greedy_equals_unbatched(model_and_tokenizer):
    model, tok = model_and_tokenizer
    one_by_one = generate_answers(model, tok, PROMPTS, max_new_tokens=10, batch_size=1)
    batched = generate_answers(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)  # left padding inside
    assert batched == one_by_one
    assert all(a.truncated and a.num_tokens == 10 for a in batched)  # a random model never says <|im_end|>


def test_answer_ends_at_the_end_of_turn_token(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, PROMPTS[1])
    new = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    # Pretend the first token not seen before position 3 ends the turn.
    k = next(i for i in range(3, len(new)) if new[i] not in new[:i])
    [answer] = generate_answers(model, tok, [PROMPTS[1]], max_new_tokens=8, stop_ids=[new[k]])
    assert not answer.truncated and answer.num_tokens == k + 1
    assert answer.text == tok.decode(new[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def test_multi_turn_replay_uses_the_models_own_answers(model_and_tokenizer):
    model, tok = model_and_tokenizer
    two_turns = [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Name a colour."},
                 {"role": "assistant", "content": "DATASET ANSWER ONE"},
                 {"role": "user", "content": "And another one?"},
                 {"role": "assistant", "content": "DATASET ANSWER TWO"}]
    others = [[{"role": "user", "content": "x " * n}] for n in (2, 15)]  # batch-mates of other lengths
    [replayed, *_] = distill_conversations(model, tok, [two_turns, *others], max_new_tokens=8, batch_size=3)
    msgs = replayed.messages
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs[:2] + msgs[3:4]] == ["Be brief.", "Name a colour.", "And another one?"]
    assert "DATASET" not in msgs[2]["content"] + msgs[4]["content"]
    assert replayed.num_answers == 2 and replayed.num_tokens == 16 and replayed.truncated
    # Turn 1 alone gives the saved first answer; turn 2 alone, with that answer as history,
    # gives the saved second answer: the second prompt held the model's own first answer.
    [first] = generate_answers(model, tok, [msgs[:2]], max_new_tokens=8, batch_size=1)
    assert first.text == msgs[2]["content"]
    [second] = generate_answers(model, tok, [msgs[:4]], max_new_tokens=8, batch_size=1)
    assert second.text == msgs[4]["content"]
    assert tok.decode(prompt_ids(tok, msgs[:4])).count(msgs[2]["content"]) == 1

    [cut] = distill_conversations(model, tok, [two_turns], max_new_tokens=8, max_turns=1)
    assert [m["role"] for m in cut.messages] == ["system", "user", "assistant"] and cut.num_answers == 1


def test_repair_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"id": 0, "messages": []}, {"id": 1, "messages": []}])
    intact = path.read_bytes()
    assert repair_jsonl(path) == 0 and path.read_bytes() == intact
    with open(path, "ab") as f:
        f.write(b'{"id": 2, "mess')  # a kill mid-append
    assert repair_jsonl(path) == len(b'{"id": 2, "mess')
    assert [r["id"] for r in read_jsonl(path)] == [0, 1]
    torn_only = tmp_path / "torn.jsonl"
    torn_only.write_bytes(b'{"id": 0')
    assert repair_jsonl(torn_only) == 8 and torn_only.read_bytes() == b""


def test_merge_sorts_by_id_drops_duplicates_and_removes_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    append_jsonl(out, [{"id": 1, "v": "final"}])
    append_jsonl(part_file(out, 0), [{"id": 4, "v": "a"}, {"id": 0, "v": "a"}])
    append_jsonl(part_file(out, 1), [{"id": 3, "v": "b"}, {"id": 1, "v": "again"}])
    append_jsonl(part_file(out, 12), [{"id": 2, "v": "c"}])  # left by an earlier run with more processes
    (tmp_path / "out.jsonl.part1.bak").write_text("not a part")
    assert [p.name for p in part_files(out)] == ["out.jsonl.part0", "out.jsonl.part1", "out.jsonl.part12"]
    assert merge_parts(out) == 5
    assert [(r["id"], r["v"]) for r in read_jsonl(out)] == [(0, "a"), (1, "final"), (2, "c"), (3, "b"), (4, "a")]
    assert part_files(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.part1.bak"]


def test_other_settings_are_refused_naming_the_keys(tmp_path):
    out = tmp_path / "out.jsonl"
    settings = {"base_model": "m", "max_new_tokens": 256, "temperature": 0.0}
    assert check_settings(out, settings) is None
    write_meta(out, {"settings": settings, "runs": []})
    append_jsonl(part_file(out, 0), [{"id": 0}])
    assert check_settings(out, settings)["settings"] == settings
    with pytest.raises(SettingsMismatchError, match=r"temperature: 0.0 in the file, 0.3 now.*overwrite=true"):
        check_settings(out, {**settings, "temperature": 0.3})
    meta_file(out).unlink()
    with pytest.raises(SettingsMismatchError, match="settings are unknown"):
        check_settings(out, settings)


def test_resume_refuses_rows_that_no_longer_match_the_data(tmp_path):
    out = tmp_path / "out.jsonl"
    data = [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}]]
    append_jsonl(part_file(out, 0), [{"id": 1, "messages": data[1] + [{"role": "assistant", "content": "a"}]}])
    assert answered_ids(out, data) == {1}
    with pytest.raises(SettingsMismatchError, match=r"ids \[1\].*data changed"):
        answered_ids(out, [data[0], [{"role": "user", "content": "edited"}]])
