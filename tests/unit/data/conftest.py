"""Data-layer fixtures: an isolated datasets cache and a small file writer."""

from __future__ import annotations

import json

import datasets
import pytest


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """load_dataset("json") caches every file it reads: keep the tests' files out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture
def write(tmp_path):
    """write(name, rows) -> path: a JSON array for *.json, JSON lines for *.jsonl, raw text for str rows."""

    def _write(name: str, rows: list | str) -> str:
        path = tmp_path / name
        if isinstance(rows, str):
            path.write_text(rows)
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            path.write_text(json.dumps(rows, indent=1))
        return str(path)

    return _write
