"""Chat template + assistant-only labels, on the default model's real tokenizer (SmolLM2, ChatML)."""

from __future__ import annotations

import logging

import datasets
import pytest

from medusa_train.data import PLAIN_CHAT_TEMPLATE, chat_template, tokenize_conversations
from medusa_train.data import tokenize as tokenize_module
from medusa_train.data.tokenize import assistant_char_spans, token_labels
from medusa_train.loss import IGNORE_INDEX

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And in French?"},
    {"role": "assistant", "content": "Deux plus deux font quatre.\n\n```\nquatre\n```"},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def own_tokenizer():
    """A tokenizer this module may change (the shared smol_tokenizer must stay untouched)."""
    from medusa_train.base_model import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def conversations(*chats) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": list(chats), "source": ["test"] * len(chats)})


def labelled_runs(ids, labels) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def skip_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "medusa_train.data.skips"]


def test_labels_are_exactly_assistant_text_and_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    row = tokenize_conversations(conversations(CHAT), tok, max_length=512)[0]
    # The same ids a model sees at inference from apply_chat_template.
    assert row["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    runs = labelled_runs(row["input_ids"], row["labels"])
    assert [tok.decode(run) for run in runs] == [reply + "<|im_end|>" for reply in REPLIES]
    # Everything else is -100: headers, system and user turns, the newline after <|im_end|>.
    labelled = sum(label != IGNORE_INDEX for label in row["labels"])
    assert labelled == sum(len(run) for run in runs)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, lab in zip(row["input_ids"], row["labels"]) if t == end and lab != IGNORE_INDEX) == 2
    assert sum(1 for t in row["input_ids"] if t == end) == 5  # system, 2 user, 2 assistant turns
    assert tok.decode(row["input_ids"][: row["labels"].index(runs[0][0])]).endswith("<|im_start|>assistant\n")


def test_offsets_and_prefix_counting_agree(smol_tokenizer):
    text, spans = assistant_char_spans(smol_tokenizer, CHAT, chat_template(smol_tokenizer))
    assert [text[s:e] for s, e in spans] == [reply + "<|im_end|>" for reply in REPLIES]
    assert token_labels(smol_tokenizer, text, spans, use_offsets=True) == \
        token_labels(smol_tokenizer, text, spans, use_offsets=False)


def test_truncation_and_rows_left_without_labels(smol_tokenizer, caplog):
    long_question = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    prompt_only = [{"role": "user", "content": "hello?"}]
    ds = conversations(CHAT, long_question, prompt_only)
    with caplog.at_level(logging.WARNING):
        out = tokenize_conversations(ds, smol_tokenizer, max_length=48)
    assert len(out) == 1
    assert len(out[0]["input_ids"]) == len(out[0]["labels"]) == 48
    assert any(label != IGNORE_INDEX for label in out[0]["labels"])
    (message,) = skip_warnings(caplog)
    assert message == ("tokenize (max_length=48): dropped 2 of 3 conversations: "
                       "1 no assistant tokens within max_length (row 2), 1 no assistant tokens (row 3)")


def test_template_errors_are_counted_not_raised(own_tokenizer, caplog):
    own_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        with caplog.at_level(logging.WARNING):
            out = tokenize_conversations(conversations(CHAT, CHAT[1:3]), own_tokenizer, max_length=128)
    finally:
        own_tokenizer.chat_template = None
    assert len(out) == 1
    assert "1 chat template error (row 1: System role not supported)" in skip_warnings(caplog)[0]
    (run,) = labelled_runs(out[0]["input_ids"], out[0]["labels"])
    assert own_tokenizer.decode(run) == "2+2 is 4.</s>"


def test_tokenizer_without_chat_template_uses_plain_format(own_tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(tokenize_module, "_warned_plain", set())
    own_tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING):
        assert chat_template(own_tokenizer) == PLAIN_CHAT_TEMPLATE
        out = tokenize_conversations(conversations(CHAT[1:3], CHAT[1:]), own_tokenizer, max_length=512)
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1  # once, not per row or call
    text = own_tokenizer.decode(out[0]["input_ids"])
    assert text == "User: What is 2+2?\n\nAssistant: 2+2 is 4.<|im_end|>\n\n"
    runs = labelled_runs(out[1]["input_ids"], out[1]["labels"])
    assert [own_tokenizer.decode(r).strip() for r in runs] == [reply + "<|im_end|>" for reply in REPLIES]


def test_tokenized_files_are_cached(smol_tokenizer, write):
    from medusa_train.data import load_conversations

    ds = load_conversations([write("qa.jsonl", [{"question": "1+1?", "answer": "2"}])])
    first = tokenize_conversations(ds, smol_tokenizer, max_length=64)
    again = tokenize_conversations(ds, smol_tokenizer, max_length=64)
    assert first.cache_files and again._fingerprint == first._fingerprint


# Trimmed-down templates of other model families: spans must still be reply + end-of-turn.
OTHER_TEMPLATES = {
    "llama3": ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
               "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               "<|eot_id|>"),
    "gemma": ("{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
              "<end_of_turn>"),
    # Like Qwen3: the last reply gets an empty think block, so prefixes differ from the full chat.
    "qwen3": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
              "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
              "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
              "<|im_end|>"),
}


@pytest.mark.parametrize("family", sorted(OTHER_TEMPLATES))
def test_spans_on_other_template_families(smol_tokenizer, family):
    template, end_of_turn = OTHER_TEMPLATES[family]
    text, spans = assistant_char_spans(smol_tokenizer, CHAT[1:], template)
    assert [text[s:e] for s, e in spans] == [reply + end_of_turn for reply in REPLIES]
