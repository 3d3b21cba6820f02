"""Self-distillation: the base model answers the data's user turns itself.

Medusa heads learn to predict what the *base model* will say next, so they train best on
the base model's own answers rather than on whatever model wrote the dataset. This
module holds the two halves of the self_distill recipe:

  generation  `distill_conversations` replays conversations turn by turn: the dataset's
              assistant turns are dropped, and every user turn is answered by the model,
              given the model's own earlier answers as history. Answers come from
              batched `model.generate` (left padding, KV cache), longest prompt first.
  writing     JSONL rows `{"id", "messages", "source", "truncated"}` appended and
              fsynced chunk by chunk to one part file per process, a torn last line cut
              off on restart, and the parts merged into the output file sorted by id.
              `<output_file>.meta.json` records the settings; resuming with other
              settings is refused (`check_settings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from medusa_train.training.checkpoint import atomic_write

# ---- generation ---------------------------------------------------------------------------

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    text: str
    num_tokens: int  # tokens the model generated, the end-of-turn token included
    truncated: bool  # hit max_new_tokens before an end-of-turn token


@dataclass
class Distilled:
    messages: list[dict]  # system and user turns of the data, assistant turns the model's own
    num_answers: int
    num_tokens: int
    truncated: bool  # some answer hit max_new_tokens


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the model's generation eos ids (chat models often list
    their end-of-turn token there, e.g. Llama 3's <|eot_id|>) and the tokenizer's eos."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model and tokenizer name no eos token: cannot tell where an answer ends")
    return sorted(set(ids))


def generation_config(max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int],
                      pad_id: int) -> GenerationConfig:
    """Exactly the decoding we record in the meta file. generate() fills every knob left
    unset from the checkpoint's generation_config.json (a repetition penalty, top_k=50...),
    so the ones that change answers are pinned here."""
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": pad_id, "num_beams": 1,
              "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "use_cache": True}
    if temperature > 0:
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)
    return GenerationConfig(do_sample=False, **common)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` through the chat template, ending in the assistant header.
    (transformers v5 returns a BatchEncoding from apply_chat_template by default.)"""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, batch_size: int = 16, stop_ids: list[int] | None = None,
                     on_batch: Callable[[list[Answer]], None] | None = None) -> list[Answer]:
    """One answer per prompt (a list of messages ending in a user turn), in input order.

    Prompts are batched longest first: similar lengths make batches dense (little left
    padding), and the largest batch comes first, so running out of memory shows at once.
    """
    stop_ids = stop_ids or stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = generation_config(max_new_tokens, temperature, top_p, stop_ids, pad_id)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[Answer | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)  # (B, T)
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             generation_config=config)  # (B, T + new)
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        done = [_cut_answer(tokenizer, row, stop_ids, max_new_tokens) for row in new_tokens]
        for i, answer in zip(batch, done):
            answers[i] = answer
        if on_batch is not None:
            on_batch(done)
    return answers


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so that every row's next token is generated at the same position."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, longest - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, longest - len(r):] = 1
    return ids, mask


def _cut_answer(tokenizer, new_tokens: list[int], stop_ids: list[int], max_new_tokens: int) -> Answer:
    """Cut at the first end-of-turn token (rows finished early are padded after it)."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new_tokens) if t in stops), None)
    if end is None:
        tokens, num_tokens, truncated = new_tokens[:max_new_tokens], min(len(new_tokens), max_new_tokens), True
    else:
        tokens, num_tokens, truncated = new_tokens[:end], end + 1, False
    # Stripped because the data layer strips message contents when it reads them: what is
    # saved is then exactly what later turns were prompted with and what training sees.
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    return Answer(text=text, num_tokens=num_tokens, truncated=truncated)


def prompt_turns(messages: list[dict], max_turns: int | None = None) -> list[dict]:
    """The turns the model is given: system and user messages, assistant ones dropped,
    cut after the `max_turns`-th user turn."""
    kept, users = [], 0
    for m in messages:
        if m["role"] == "assistant":
            continue
        if m["role"] == "user":
            if max_turns is not None and users == max_turns:
                break
            users += 1
        kept.append({"role": m["role"], "content": m["content"]})
    return kept


def count_user_turns(messages: list[dict], max_turns: int | None = None) -> int:
    return sum(m["role"] == "user" for m in prompt_turns(messages, max_turns))


class _Replay:
    """One conversation being replayed: its prompt turns, and the history built so far
    (data turns plus the model's own answers)."""

    def __init__(self, turns: list[dict]):
        self.turns, self.next, self.history = turns, 0, []
        self.num_answers = self.num_tokens = 0
        self.truncated = False

    def prompt(self) -> list[dict] | None:
        """History + the next user turn, or None when every user turn is answered."""
        while self.next < len(self.turns) and self.turns[self.next]["role"] != "user":
            self.history.append(self.turns[self.next])  # a system message: context, not a question
            self.next += 1
        return self.history + [self.turns[self.next]] if self.next < len(self.turns) else None

    def add(self, answer: Answer) -> None:
        self.history += [self.turns[self.next], {"role": "assistant", "content": answer.text}]
        self.next += 1
        self.num_answers += 1
        self.num_tokens += answer.num_tokens
        self.truncated |= answer.truncated


def distill_conversations(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                          temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16,
                          max_turns: int | None = None, stop_ids: list[int] | None = None,
                          on_batch: Callable[[list[Answer]], None] | None = None) -> list[Distilled]:
    """Answer every user turn of every conversation with the model's own replies.

    Turn k of a conversation needs the answer to turn k-1, so generation goes in waves:
    wave k batches the k-th user turn of all conversations that have one.
    """
    replays = [_Replay(prompt_turns(m, max_turns)) for m in conversations]
    while True:
        pending = [(r, p) for r in replays if (p := r.prompt()) is not None]
        if not pending:
            break
        answers = generate_answers(model, tokenizer, [p for _, p in pending], max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, batch_size=batch_size,
                                   stop_ids=stop_ids, on_batch=on_batch)
        for (replay, _), answer in zip(pending, answers):
            replay.add(answer)
    return [Distilled(r.history + r.turns[r.next:], r.num_answers, r.num_tokens, r.truncated) for r in replays]


# ---- resumable JSONL output ---------------------------------------------------------------

_PART = re.compile(r"\.part(\d+)")


def part_file(output_file: Path, rank: int) -> Path:
    return output_file.with_name(f"{output_file.name}.part{rank}")


def part_files(output_file: Path) -> list[Path]:
    """Every process's part file, whatever the number of processes that wrote them."""
    output_file = Path(output_file)
    if not output_file.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_file.parent.iterdir()
             if p.name.startswith(output_file.name) and (m := _PART.fullmatch(p.name[len(output_file.name):]))]
    return [p for _, p in sorted(found)]


def meta_file(output_file: Path) -> Path:
    return Path(output_file).with_name(Path(output_file).name + ".meta.json")


def answers_model(source: str | Path) -> str | None:
    """The base model that wrote a self-distilled data file (from its meta file), or None."""
    meta = meta_file(Path(source))
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("settings", {}).get("base_model")


def warn_other_models_answers(sources: list[str], model_name: str) -> list[str]:
    """Self-distilled sources written by another base model than the one being trained: heads
    and drafts learn best from the answers of the model they will decode for. -> the warnings."""
    from medusa_train.data.readers import resolve_data_path

    warnings = []
    for source in sources:
        try:
            writer = answers_model(resolve_data_path(source))
        except FileNotFoundError:  # a hub dataset id
            continue
        if writer is not None and writer != model_name:
            warnings.append(f"{source} holds the answers of {writer}, not of {model_name}: for heads or a draft that "
                            f"match {model_name}, make its own first (python -m medusa_train +recipe=self_distill "
                            f"model.name_or_path={model_name} data.sources=[...])")
    for message in warnings:
        log.warning(message)
    return warnings


def repair_jsonl(path: Path) -> int:
    """Cut whatever follows the last newline: the torn line of a kill mid-append. Rows are
    appended whole and fsynced, so a torn row can only be the tail. Returns bytes cut."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end, pos = 0, size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                end = pos - step + newline + 1
                break
            pos -= step
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return size - end


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON row ({e}); if the file was cut mid-line, the "
                                 "self_distill recipe repairs it on resume=true") from e


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append whole rows and fsync: after a kill the file holds complete rows plus at most
    one torn tail, which `repair_jsonl` cuts."""
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def written_rows(output_file: Path) -> Iterator[dict]:
    """Rows already in the output file and in every part file."""
    for path in [Path(output_file)] + part_files(output_file):
        if path.exists():
            yield from read_jsonl(path)


def prompt_digest(messages: list[dict], max_turns: int | None = None) -> str:
    """A fingerprint of the turns a conversation asks (assistant turns excluded), to tell
    whether a saved row still answers the same data row."""
    return hashlib.sha1(json.dumps(prompt_turns(messages, max_turns), ensure_ascii=False).encode()).hexdigest()


def answered_ids(output_file: Path, conversations: list[list[dict]], max_turns: int | None = None) -> set[int]:
    """Ids of the data rows already answered in output_file or its parts.

    Ids are row numbers in the data, so each saved row is checked to ask the same turns
    as the data row of its id now: an edited or reordered data file is refused rather
    than silently answered twice or not at all. Ids past the end of the data (a smaller
    max_rows) are kept in the file and ignored here.
    """
    done, changed = set(), []
    for row in written_rows(output_file):
        i = row["id"]
        if i < len(conversations) and prompt_digest(row["messages"]) != prompt_digest(conversations[i], max_turns):
            changed.append(i)
        done.add(i)
    if changed:
        raise SettingsMismatchError(
            f"refusing to resume {output_file}: {len(changed)} saved row(s) (ids {changed[:5]}) ask other turns than "
            "the data rows with those ids now, so the data changed since they were written. Use the same data, "
            "or pass overwrite=true to regenerate, or self_distill.output_file=<another file>")
    return done


def merge_parts(output_file: Path) -> int:
    """Fold the part files into output_file, one row per id sorted by id; returns rows.

    Rows are located by byte offset rather than held in memory. The output file is
    replaced atomically and only then are the parts deleted, so a kill at any point loses
    nothing (the next merge drops the duplicate ids).
    """
    output_file = Path(output_file)
    parts = part_files(output_file)
    index: dict[int, tuple[Path, int, int]] = {}  # id -> (file, offset, length)
    for path in ([output_file] if output_file.exists() else []) + parts:
        repair_jsonl(path)
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                index.setdefault(json.loads(line)["id"], (path, offset, len(line)))
                offset += len(line)

    def write(tmp: Path) -> None:
        with ExitStack() as stack:
            out = stack.enter_context(open(tmp, "wb"))
            handles = {path: stack.enter_context(open(path, "rb")) for path, _, _ in index.values()}
            for row_id in sorted(index):
                path, offset, length = index[row_id]
                handles[path].seek(offset)
                out.write(handles[path].read(length))

    atomic_write(output_file, write)
    for p in parts:
        p.unlink()
    return len(index)


# ---- settings recorded next to the data ---------------------------------------------------


class SettingsMismatchError(ValueError):
    pass


def check_settings(output_file: Path, settings: dict) -> dict | None:
    """The saved meta if it matches `settings`; None if there is no output yet.

    Answers generated with other settings (model, temperature, max_new_tokens...) must not
    be mixed into one file, so any difference is refused, naming the keys.
    """
    output_file, path = Path(output_file), meta_file(output_file)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
    if not path.exists():
        if output_file.exists() or part_files(output_file):
            raise SettingsMismatchError(
                f"{output_file} exists but {path.name} does not, so its generation settings are unknown: "
                "pass overwrite=true to regenerate it, or self_distill.output_file=<another file>")
        return None
    meta = json.loads(path.read_text())
    saved = meta.get("settings", {})
    diff = [f"{k}: {saved.get(k)!r} in the file, {settings.get(k)!r} now"
            for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        raise SettingsMismatchError(
            f"refusing to resume {output_file}: it was generated with other settings ({'; '.join(diff)}). "
            "Mixing answers generated two ways in one file would make it neither. Rerun with the file's "
            "settings, or pass overwrite=true to regenerate it, or self_distill.output_file=<another file>")
    return meta


def write_meta(output_file: Path, meta: dict) -> None:
    atomic_write(meta_file(output_file), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
