"""Batches for training heads: the truncated vocabulary, padded labels, logits at target positions."""

from __future__ import annotations

import torch

from medusa_train.heads import MedusaHeads
from medusa_train.loss import IGNORE_INDEX, head_targets


def frequent_tokens(labels: list[list[int]], vocab_size: int, n: int) -> torch.Tensor:
    """The n most frequent target tokens (ties: lower id first), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in labels:
        ids = torch.tensor([t for t in row if t != IGNORE_INDEX], dtype=torch.long)
        counts.index_add_(0, ids, torch.ones_like(ids))
    most = torch.sort(counts, descending=True, stable=True).indices[:n]  # stable: lower id first on ties
    return most.sort().values


def head_target_counts(heads: MedusaHeads, labels: torch.Tensor, K: int) -> torch.Tensor:
    targets = heads.to_head_vocab(head_targets(labels, K))
    return (targets != IGNORE_INDEX).flatten(1).sum(-1)


def selected_logits(heads_model, heads: MedusaHeads, lm_head, hidden, labels, K):
    """Head logits only at positions where some head has a target: (K, N, V'), targets (K, N).

    Assistant tokens are a fraction of each row; projecting only those positions onto the
    vocabulary is most of the saving on CPU.
    """
    targets = head_targets(labels, K)  # (K, B, T)
    keep = (targets != IGNORE_INDEX).any(0)  # (B, T)
    logits = heads_model(hidden[keep], lm_head)  # (K, N, V')
    return logits, heads.to_head_vocab(targets[:, keep])


def pad_labels(rows: list[list[int]]) -> torch.Tensor:
    """(B, T) right-padded with IGNORE_INDEX."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                                           padding_value=IGNORE_INDEX)
