"""Conversations -> input_ids + labels: the chat template, with loss on assistant tokens only.

Labels are the input ids on each assistant message's content and the end-of-turn marker
the template writes after it (`<|im_end|>`, `<|eot_id|>`, `</s>`: the model must learn to
stop), and -100 elsewhere: system and user turns, role headers, the whitespace after the
end-of-turn marker.

Few chat templates mark assistant text with `{% generation %}`, so
`return_assistant_tokens_mask` is no help. Instead the spans come from rendering
prefixes of the conversation as text (for assistant message i):
  header end = where render(messages[:i], add_generation_prompt=True) stops matching the full text
  turn end   = where render(messages[:i+1]) stops matching the full text
The content is searched between the two. The end-of-turn marker is what the template
writes after the reply in render(messages[:i+1]), trailing whitespace dropped, where the
full text goes on with it; otherwise what follows the content up to the turn end.
Character spans map to tokens through the fast tokenizer's offsets, so tokens merged
across a boundary are handled (any overlap counts).
"""

from __future__ import annotations

import logging

import datasets
import jinja2

from medusa_train.data.skips import DETAIL, ROW, SKIP, SKIP_FEATURES, drop_skipped
from medusa_train.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

# For tokenizers without a chat template (base models):
#   "User: {content}\n\nAssistant: {content}{eos}\n\n", with "System: ..." first if any;
#   the generation prompt is "Assistant:" (no trailing space, so the reply's first token
#   keeps its leading space as a BPE tokenizer would split it).
#   Newlines are jinja string literals: transformers renders with trim_blocks, which
#   would eat a literal newline after a block tag.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
})

_warned_plain: set[str] = set()


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or PLAIN_CHAT_TEMPLATE (with one warning) if it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned_plain:
        _warned_plain.add(name)
        log.warning("tokenizer %s has no chat template: using the plain 'User: ... / Assistant: ...' format "
                    "(medusa_train.data.tokenize.PLAIN_CHAT_TEMPLATE)", name)
    return PLAIN_CHAT_TEMPLATE


def tokenize_conversations(ds: datasets.Dataset, tokenizer, max_length: int,
                           num_proc: int | None = None) -> datasets.Dataset:
    """`messages` rows -> Dataset with `input_ids` and `labels` (lists of int), at most
    max_length tokens (the end is cut). Rows left without a labelled token are dropped,
    counted in one warning. Runs through Dataset.map, so datasets caches the result."""
    template = chat_template(tokenizer)
    out = ds.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=datasets.Features({**TOKENIZED_FEATURES, **SKIP_FEATURES}),
        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length),
        num_proc=num_proc,
        desc="tokenizing",
    )
    return drop_skipped(out, f"tokenize (max_length={max_length})", verb="dropped", unit="conversations")


def assistant_char_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant
    message's content plus its end-of-turn marker."""

    def render(msgs, add_generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header_end = _shared_prefix_len(render(messages[:i], add_generation_prompt=True), full) if i else 0
        through = render(messages[: i + 1])
        turn_end = _shared_prefix_len(through, full)
        content = message["content"]
        start = full.find(content, header_end, max(turn_end, header_end))
        if start < 0:  # prefixes render differently from the full chat: search on
            start = full.find(content, header_end)
        if start < 0:  # the template rewrote the content: label the whole turn after its header
            start = content_end = header_end
        else:
            content_end = start + len(content)
        # The end-of-turn marker is what the template writes after this reply as the last
        # message. Templates that render the last turn differently (Qwen3 adds an empty
        # think block to it) make the prefix diverge, so look for the marker itself.
        marker = through[through.rfind(content) + len(content):].rstrip() if content in through else ""
        if marker and full.startswith(marker, content_end):
            end = content_end + len(marker)
        else:
            end = content_end + len(full[content_end:turn_end].rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def _shared_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # largest k with a[:k] == b[:k]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def token_labels(tokenizer, text: str, spans: list[tuple[int, int]],
                 use_offsets: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels: the id where a token overlaps a span, -100 elsewhere.
    use_offsets: default tokenizer.is_fast (only fast tokenizers report offsets)."""
    if tokenizer.is_fast if use_offsets is None else use_offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        token_spans = _overlapping_tokens(enc["offset_mapping"], spans)
    else:  # no offsets: count the tokens of the text before each span boundary
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        token_spans = [(_num_tokens(tokenizer, text[:s]), _num_tokens(tokenizer, text[:e])) for s, e in spans]
    labels = [IGNORE_INDEX] * len(ids)
    for first, last in token_spans:
        labels[first:last] = ids[first:last]
    return ids, labels


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _overlapping_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last) token ranges whose character offsets overlap each span."""
    out = []
    for start, end in spans:
        hits = [t for t, (a, b) in enumerate(offsets) if b > start and a < end]
        if hits:
            out.append((hits[0], hits[-1] + 1))
    return out


def _tokenize_batch(batch: dict, indices: list[int], tokenizer, template: str, max_length: int) -> dict:
    out = {"input_ids": [], "labels": [], SKIP: [], DETAIL: [], ROW: []}
    for messages, index in zip(batch["messages"], indices):
        ids, labels, skip, detail = [], [], None, None
        try:
            text, spans = assistant_char_spans(tokenizer, messages, template)
        except (jinja2.TemplateError, ValueError) as e:  # e.g. "roles must alternate" raised by the template
            skip, detail = "chat template error", str(e)[:200]
        else:
            ids, labels = token_labels(tokenizer, text, spans)
            if not any(label != IGNORE_INDEX for label in labels):
                skip = "no assistant tokens"
            ids, labels = ids[:max_length], labels[:max_length]
            if skip is None and not any(label != IGNORE_INDEX for label in labels):
                skip = "no assistant tokens within max_length"
        out["input_ids"].append(ids if skip is None else [])
        out["labels"].append(labels if skip is None else [])
        out[SKIP].append(skip)
        out[DETAIL].append(detail)
        out[ROW].append(index + 1)
    return out
