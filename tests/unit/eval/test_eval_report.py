"""Aggregation and the result files: JSON, markdown and PNG hold the right numbers."""

from __future__ import annotations

import json

import pytest

from medusa_train.eval.bench import by_category, method_order
from medusa_train.eval.report import markdown_table, write_results, write_search


def record(category, hf, medusa, identical):
    """hf / medusa: (new tokens, seconds, forwards)."""
    def res(t, s, f, same):
        return {"new_tokens": t, "seconds": s, "forwards": f, "identical": same}

    return {"question_id": category, "category": category, "turn": 0,
            "results": {"hf_generate": res(*hf, True), "medusa": res(*medusa, identical)}}


RECORDS = [record("a", (10, 1.0, 10), (10, 0.5, 4), True), record("b", (20, 2.0, 20), (20, 0.5, 5), False)]


def test_aggregates():
    cats = by_category(RECORDS)
    assert list(cats) == ["a", "b", "overall"]
    overall = cats["overall"]
    assert overall["hf_generate"]["tokens_per_s"] == pytest.approx(10.0)
    assert overall["hf_generate"]["tau"] == 1.0 and overall["hf_generate"]["speedup"] == 1.0
    assert overall["medusa"]["tokens_per_s"] == pytest.approx(30.0)
    assert overall["medusa"]["speedup"] == pytest.approx(3.0)  # same prompts, 3x the throughput
    assert overall["medusa"]["tau"] == pytest.approx(30 / 9)
    assert overall["medusa"]["identical"] == 1
    assert cats["a"]["medusa"]["speedup"] == pytest.approx(2.0) and cats["b"]["medusa"]["speedup"] == pytest.approx(4.0)
    assert cats["a"]["medusa"]["tau"] == pytest.approx(2.5)


def test_method_order_alternates():
    names = ["hf_generate", "runtime_ar", "medusa"]
    assert method_order(names, 0) == ["hf_generate", "runtime_ar", "medusa"]
    assert method_order(names, 1) == ["medusa", "runtime_ar", "hf_generate"]


def test_write_results(tmp_path):
    cats = by_category(RECORDS)
    paths = write_results(tmp_path / "eval", {"categories": cats, "records": RECORDS}, title="test run")
    data = json.loads(paths["json"].read_text())
    assert data["categories"]["overall"]["medusa"]["speedup"] == pytest.approx(3.0)
    assert data["records"][1]["results"]["medusa"]["identical"] is False
    md = paths["md"].read_text()
    assert md.startswith("# test run")
    assert "| Medusa (tree) (`medusa`) | 3.33 | 30.0 | 3.00x | 1/2 |" in md
    assert "| **overall** | 2 | 10.0 | 3.33 | 30.0 | 3.00x | 1/2 |" in md
    assert "| a | 1 | 10.0 | 2.50 | 20.0 | 2.00x | 1/1 |" in md
    assert markdown_table(cats) in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000


def test_write_search(tmp_path):
    curve = [{"num_nodes": 1, "added": None, "p_added": None, "expected_accept_length": 1.0, "step_ms": 10.0, "tokens_per_s": 100.0},
             {"num_nodes": 2, "added": [0], "p_added": 0.6, "expected_accept_length": 1.6, "step_ms": 12.0, "tokens_per_s": 133.333}]
    search = {"num_nodes": 2, "choices": [[0]], "expected_accept_length": 1.6, "step_ms": 12.0, "tokens_per_s": 133.333,
              "curve": curve}
    accuracy = {"source": "self", "positions": [100, 99], "topk_accuracy": [[0.6] + [0.8] * 9, [0.3] + [0.5] * 9]}
    paths = write_search(tmp_path, {"search": search, "latency": {"forward_ms": [9.0, 10.0]}, "accuracy": accuracy})
    md = paths["md"].read_text()
    assert "| 2 | [0] | 0.6 | 1.600 | 12.0 | 133.33 **<- chosen** |" in md
    assert "| 1 | 0.600 | 0.800 | 0.800 |" in md
    assert json.loads(paths["json"].read_text())["search"]["choices"] == [[0]]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_summary_names_the_plain_medusa_tree_only_when_that_method_ran():
    from medusa_train.eval.report import summary_lines

    tree = {"num_nodes": 3, "source": "heads", "choices": [[0], [1]]}
    row = {"tau": 1.5, "tokens_per_s": 10.0, "speedup": 1.1, "identical": 1, "prompts": 1}
    named_only = summary_lines({"tree": tree, "categories": {"overall": {"medusa:mc_sim_7b_63": row}}})
    assert not any("Tree" in line for line in named_only)  # that method decoded with its named tree
    plain = summary_lines({"tree": tree, "categories": {"overall": {"medusa": row}}})
    assert plain == ["Tree of `medusa`: 3 nodes (heads): `[[0], [1]]`"]
