"""collate: right padding to the longest row (or a multiple), mask, labels -100 on padding."""

from __future__ import annotations

import pytest
import torch

from medusa_train.data import collate

PAD = 2  # like SmolLM2, whose pad token is its end-of-turn token


def test_right_padding_to_longest():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, PAD], "labels": [8, PAD]}]
    batch = collate(rows, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # The labelled end-of-turn token equal to the pad id stays labelled; only padding is -100.
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, PAD, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_to_multiple_of():
    batch = collate([{"input_ids": list(range(9)), "labels": list(range(9))}], pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum() == 9 and (batch["labels"][0, 9:] == -100).all()


def test_tensor_rows_and_missing_pad_id():
    rows = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}]
    assert collate(rows, pad_token_id=0)["input_ids"].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(rows, pad_token_id=None)
