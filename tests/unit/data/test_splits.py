"""train_eval_split: sizes, determinism, no overlap, edge cases."""

from __future__ import annotations

import datasets
import pytest

from medusa_train.data import train_eval_split


def numbers(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"x": list(range(n))})


def test_sizes_disjoint_and_seeded():
    train, eval_ = train_eval_split(numbers(100), 0.05, seed=0)
    assert (len(train), len(eval_)) == (95, 5)
    assert set(train["x"]).isdisjoint(eval_["x"]) and set(train["x"]) | set(eval_["x"]) == set(range(100))
    assert train_eval_split(numbers(100), 0.05, seed=0)[1]["x"] == eval_["x"]
    assert train_eval_split(numbers(100), 0.05, seed=1)[1]["x"] != eval_["x"]


def test_edge_cases():
    train, eval_ = train_eval_split(numbers(10), 0.0, seed=0)
    assert (len(train), len(eval_)) == (10, 0)
    assert len(train_eval_split(numbers(10), 0.01, seed=0)[1]) == 1  # a positive fraction gives at least one row
    with pytest.raises(ValueError, match="nothing to train on"):
        train_eval_split(numbers(1), 0.5, seed=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(numbers(10), 1.0, seed=0)
