"""Benchmark question files in the MT-bench / Spec-Bench schema.

One JSON object per line: {"question_id": int | str, "category": str, "turns": [str, ...]}
(other keys, e.g. Spec-Bench's "reference", are ignored). MT-bench is bundled as
data/mt_bench_question.jsonl (`bench=mt_bench`); any other file is given by path
(`bench=path/to/question.jsonl`, e.g. Spec-Bench's data/spec_bench/question.jsonl).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medusa_train.data import resolve_data_path

BUNDLED = {"mt_bench": "data/mt_bench_question.jsonl"}


class QuestionFileError(ValueError):
    """A question file that does not follow the schema; the message names file, row and field."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def resolve_bench(bench: str) -> Path:
    """A bundled name (mt_bench) or a path -> the question file."""
    if bench in BUNDLED:
        return resolve_data_path(BUNDLED[bench])
    try:
        return resolve_data_path(bench)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"bench={bench!r} is neither a bundled question set ({', '.join(BUNDLED)}) nor an existing file"
        ) from None


def load_questions(path: str | Path) -> list[Question]:
    """Read every row; a malformed row raises QuestionFileError naming the file, row (1-based) and field."""
    path = Path(path)
    questions, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {row}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(raw, dict):
                raise QuestionFileError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            question = _parse(raw, where)
            if question.question_id in seen:
                raise QuestionFileError(
                    f"{where}: field 'question_id': {question.question_id!r} repeats row {seen[question.question_id]}"
                )
            seen[question.question_id] = row
            questions.append(question)
    if not questions:
        raise QuestionFileError(f"{path}: no questions")
    return questions


def _parse(raw: dict, where: str) -> Question:
    for name in ("question_id", "category", "turns"):
        if name not in raw:
            raise QuestionFileError(f"{where}: missing field {name!r}")
    qid, category, turns = raw["question_id"], raw["category"], raw["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise QuestionFileError(f"{where}: field 'question_id' must be an integer or a string, got {qid!r}")
    if not isinstance(category, str) or not category.strip():
        raise QuestionFileError(f"{where}: field 'category' must be a non-empty string, got {category!r}")
    if not isinstance(turns, list) or not turns:
        raise QuestionFileError(f"{where}: field 'turns' must be a non-empty list of strings, got {turns!r}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise QuestionFileError(f"{where}: field 'turns[{i}]' must be a non-empty string, got {turn!r}")
    return Question(qid, category.strip(), tuple(turns))


def select_questions(questions: list[Question], num_questions: int | None) -> list[Question]:
    """The first `num_questions` taken round-robin over categories (in file order), so that a
    small subset covers every category: MT-bench's 8 categories x 2 = num_questions=16."""
    if num_questions is None or num_questions >= len(questions):
        return list(questions)
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    picked, depth = [], 0
    while len(picked) < num_questions:
        for qs in by_category.values():
            if depth < len(qs) and len(picked) < num_questions:
                picked.append(qs[depth])
        depth += 1
    order = {id(q): i for i, q in enumerate(questions)}
    return sorted(picked, key=lambda q: order[id(q)])
