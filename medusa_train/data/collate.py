"""Batch tokenized rows: right padding, attention mask, labels -100 on padding."""

from __future__ import annotations

import math

import torch

from medusa_train.loss import IGNORE_INDEX


def collate(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """rows with `input_ids` and `labels` (lists or 1-D tensors) -> (B, T) long tensors
    input_ids, attention_mask, labels; T is the longest row, rounded up to
    pad_to_multiple_of if given (e.g. 8, for tensor-core friendly shapes).

    Padding is found by position, not by id: pad_token_id is often the eos token, which
    also appears (labelled) at the end of assistant turns."""
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (set tokenizer.pad_token, e.g. to the eos token)")
    if not rows:
        raise ValueError("collate got no rows")
    lengths = [len(row["input_ids"]) for row in rows]
    T = max(lengths)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
