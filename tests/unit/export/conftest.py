"""Fixtures for the export tests: a tiny random Llama (built from a config) and its saved folder."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from tests.unit.export.export_helpers import HIDDEN, VOCAB


@pytest.fixture(scope="session")
def base():
    return tiny_model("llama", vocab_size=VOCAB)


@pytest.fixture
def hidden():
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(7))  # (B, T, H)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, base):
    """The tiny base saved as a local model folder, so load_base_model(path) can read it."""
    path = tmp_path_factory.mktemp("tiny_base")
    base.save_pretrained(path)
    return path
