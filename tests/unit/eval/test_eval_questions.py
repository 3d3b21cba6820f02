"""Question files: the MT-bench / Spec-Bench schema, clear errors for bad rows, category-balanced subsets."""

from __future__ import annotations

import json

import pytest

from medusa_train.eval.questions import QuestionFileError, load_questions, resolve_bench, select_questions


def write(tmp_path, rows, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reads_good_rows_and_ignores_extra_keys(tmp_path):
    path = write(tmp_path, [
        {"question_id": 1, "category": "writing", "turns": ["a", "b"]},
        "",
        {"question_id": "x-2", "category": "math", "turns": ["c"], "reference": ["42"]},
    ])
    qs = load_questions(path)
    assert [(q.question_id, q.category, q.turns) for q in qs] == [(1, "writing", ("a", "b")), ("x-2", "math", ("c",))]


def test_bundled_mt_bench():
    qs = load_questions(resolve_bench("mt_bench"))
    assert len(qs) == 80 and all(len(q.turns) == 2 for q in qs)
    assert len({q.category for q in qs}) == 8


@pytest.mark.parametrize("bad, match", [
    ('{"question_id": 2, "category": "math", "turns": ["x"]', r"row 2: not valid JSON"),
    ({"question_id": 2, "turns": ["x"]}, r"row 2: missing field 'category'"),
    ({"question_id": 2, "category": "math", "turns": "x"}, r"row 2: field 'turns' must be a non-empty list"),
    ({"question_id": 2, "category": "math", "turns": []}, r"row 2: field 'turns' must be a non-empty list"),
    ({"question_id": 2, "category": "math", "turns": ["ok", ""]}, r"row 2: field 'turns\[1\]'"),
    ({"question_id": 2.5, "category": "math", "turns": ["x"]}, r"row 2: field 'question_id'"),
    ({"question_id": 1, "category": "math", "turns": ["x"]}, r"row 2: field 'question_id': 1 repeats row 1"),
    ([1, 2], r"row 2: expected a JSON object"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, bad, match):
    path = write(tmp_path, [{"question_id": 1, "category": "writing", "turns": ["a"]}, bad], name="bad.jsonl")
    with pytest.raises(QuestionFileError, match=match) as err:
        load_questions(path)
    assert "bad.jsonl" in str(err.value)


def test_unknown_bench_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a bundled question set"):
        resolve_bench("no_such_bench.jsonl")


def test_subset_is_round_robin_over_categories_in_file_order(tmp_path):
    rows = [{"question_id": i, "category": c, "turns": ["t"]} for i, c in enumerate("aaabbc")]
    qs = load_questions(write(tmp_path, rows))
    assert [q.question_id for q in select_questions(qs, 4)] == [0, 1, 3, 5]  # a, b, c, then a again
    assert len(select_questions(qs, None)) == 6
