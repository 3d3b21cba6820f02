"""Row shapes we read, and how each becomes `messages: [{role, content}]`.

Pure Python, no I/O: `detect_format` picks a format from a file's columns, and
`normalize_row` turns one raw row into zero or more conversations, or says why the row
is unusable (a `Skip`). Readers count the skips and warn once per file.

Formats (`format=` in the data config):
  sharegpt     conversations: [{from: human|gpt|system|..., value}]
  messages     messages: [{role, content}]  (OpenAI style)
  instruction  instruction, optional input, output | response (Alpaca, GPTeacher);
               or instances: [{input, output}] (self-instruct: one conversation per
               instance); no output at all = prompt only
  qa           question, answer | response (GSM8K)
  completion   prompt, completion (T0 style)
  prompt       prompt only: {prompt} rows or bare JSON strings
Prompt-only rows become conversations with only user turns: self-distillation answers
them later; training skips them as "no assistant turn".

Skip reasons: empty, no user turn, no assistant turn, unknown role, wrong type,
non-string content, missing field. Message text is stripped of surrounding whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("sharegpt", "messages", "instruction", "qa", "completion", "prompt")

# ShareGPT dumps name the assistant after whichever product answered.
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}

# The columns each format needs. Also the detection order: the first format whose
# columns are all present wins (messages before conversations, a pair before a lone prompt).
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction",),
    "qa": ("question",),
    "completion": ("prompt", "completion"),
    "prompt": ("prompt",),
}


class DataError(ValueError):
    """A file or dataset that cannot be read as conversations at all (ours, not pyarrow's)."""


@dataclass(frozen=True)
class Skip:
    reason: str  # a short category, counted per file: "empty", "unknown role", ...
    detail: str | None = None  # what and where in the row, e.g. "'robot' in conversations[1].from"


def detect_format(columns: list[str] | set[str], name: str) -> str:
    present = set(columns)
    for fmt, needed in REQUIRED_COLUMNS.items():
        if all(c in present for c in needed):
            return fmt
    raise DataError(
        f"{name}: cannot tell the format from its columns {sorted(present)}. Expected one of: "
        "conversations (sharegpt), messages, instruction [+ input] + output|response|instances, "
        "question + answer (qa), prompt + completion, prompt; or pass format= explicitly "
        f"({', '.join(FORMATS)})"
    )


def check_columns(fmt: str, columns: list[str] | set[str], name: str) -> None:
    if fmt not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown data format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in set(columns)]
    if missing:
        raise DataError(f"{name}: format {fmt!r} needs column(s) {missing}; the file has {sorted(columns)}")


def normalize_row(row: object, fmt: str, require_assistant: bool) -> list[list[dict]] | Skip:
    """One raw row -> conversations (usually one; self-instruct rows give one per instance)."""
    if isinstance(row, str):  # a bare JSON string is a prompt (oasst prompt lists)
        row = {"prompt": row}
    if not isinstance(row, dict):
        return Skip("wrong type", f"row is {type(row).__name__}, expected an object")
    try:
        conversations = _READERS[fmt](row)
    except _SkipRow as e:
        return e.skip
    out = []
    for messages in conversations:
        if not messages or any(not m["content"] for m in messages):
            return Skip("empty")
        messages = _drop_leading_assistant(messages)
        if not any(m["role"] == "user" for m in messages):
            return Skip("no user turn")
        if require_assistant and not any(m["role"] == "assistant" for m in messages):
            return Skip("no assistant turn")
        out.append(messages)
    return out


class _SkipRow(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        self.skip = Skip(reason, detail)


def _text(row: dict, field: str, required: bool = True, where: str = "") -> str | None:
    """A stripped string field. Stripped because templates differ in trimming: stripped
    content renders the same everywhere, so tokenize can find it in the rendered chat.
    `where` prefixes the field name in skip details (e.g. "instances[2].")."""
    value = row.get(field)
    if value is None:
        if required:
            raise _SkipRow("missing field", where + field)
        return None
    if not isinstance(value, str):
        raise _SkipRow("non-string content", f"{where}{field} is {type(value).__name__}")
    return value.strip()


def _first_present(row: dict, fields: tuple[str, ...]) -> str | None:
    return next((f for f in fields if row.get(f) is not None), None)


def _turns(row: dict, field: str) -> list[list[dict]]:
    turns = row.get(field)
    if turns is None:
        raise _SkipRow("missing field", field)
    if not isinstance(turns, list):
        raise _SkipRow("wrong type", f"{field} is {type(turns).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise _SkipRow("wrong type", f"{where} is {type(turn).__name__}, expected an object")
        # Both key pairs are accepted in both formats: datasets mix them freely.
        role_key = _first_present(turn, ("from", "role")) or "role"
        content_key = _first_present(turn, ("value", "content")) or "content"
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise _SkipRow("wrong type" if role is not None else "missing field",
                           f"{where}.{role_key}" + (f" is {type(role).__name__}" if role is not None else ""))
        if role.lower() not in ROLE_ALIASES:
            raise _SkipRow("unknown role", f"{role!r} in {where}.{role_key}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise _SkipRow("non-string content", f"{where}.{content_key} is {type(content).__name__}")
        if not content.strip():
            raise _SkipRow("empty", f"{where}.{content_key}")
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": content.strip()})
    return [messages]


def _pair(user: str, assistant: str | None, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def _join(instruction: str, extra: str | None) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


def _system(row: dict) -> str | None:
    field = _first_present(row, ("system", "system_prompt"))
    return _text(row, field) if field else None


def _instruction(row: dict) -> list[list[dict]]:
    instruction = _text(row, "instruction")
    system = _system(row)
    instances = row.get("instances")
    if instances:  # self-instruct: one conversation per {input, output} instance
        if not isinstance(instances, list):
            raise _SkipRow("wrong type", f"instances is {type(instances).__name__}, expected a list")
        out = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise _SkipRow("wrong type", f"instances[{i}] is {type(inst).__name__}, expected an object")
            where = f"instances[{i}]."
            user = _join(instruction, _text(inst, "input", required=False, where=where))
            out.append(_pair(user, _text(inst, "output", required=False, where=where), system))
        return out
    answer_field = _first_present(row, ("output", "response"))
    answer = _text(row, answer_field) if answer_field else None
    return [_pair(_join(instruction, _text(row, "input", required=False)), answer, system)]


def _qa(row: dict) -> list[list[dict]]:
    answer_field = _first_present(row, ("answer", "response"))
    answer = _text(row, answer_field) if answer_field else None
    return [_pair(_text(row, "question"), answer, _system(row))]


def _prompt(row: dict) -> list[list[dict]]:
    return [_pair(_text(row, "prompt"), _text(row, "completion", required=False), _system(row))]


_READERS = {
    "sharegpt": lambda row: _turns(row, "conversations"),
    "messages": lambda row: _turns(row, "messages"),
    "instruction": _instruction,
    "qa": _qa,
    "completion": _prompt,
    "prompt": _prompt,
}


def _drop_leading_assistant(messages: list[dict]) -> list[dict]:
    """Drop assistant turns before the first user turn (as FastChat does): they answer
    nothing, and many chat templates reject a conversation that opens with one."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    end = start
    while end < len(messages) and messages[end]["role"] == "assistant":
        end += 1
    return messages[:start] + messages[end:]
