"""Medusa head losses: which token each head predicts, stated once.

Position t of the sequence feeds the base lm_head, which predicts token t+1. Head k
(0-based) at position t predicts token t+k+2. With `labels` the input ids where loss
counts and -100 elsewhere, head k's target at position t is labels[t+k+2].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def head_targets(labels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T) labels -> (K, B, T) targets: targets[k, :, t] = labels[:, t + k + 2], -100 past the end."""
    B, T = labels.shape
    targets = labels.new_full((num_heads, B, T), IGNORE_INDEX)
    for k in range(num_heads):
        shift = k + 2
        if shift < T:
            targets[k, :, : T - shift] = labels[:, shift:]
    return targets


def head_weights(num_heads: int, decay: float, coefficient: float = 1.0) -> list[float]:
    """w_k = coefficient * decay**k, k = 0..K-1 (the Medusa paper's lambda_k)."""
    return [coefficient * decay**k for k in range(num_heads)]


def medusa_loss(head_logits: torch.Tensor, targets: torch.Tensor, weights: list[float], token_counts=None):
    """Weighted sum of per-head mean CE.

    head_logits (K, ..., V), targets (K, ...) in the heads' vocabulary. Each head's CE sum
    is divided by token_counts[k] (default: this batch's target count), so callers that
    split one global batch over micro-batches and processes pass the global counts and
    get exactly the global mean.
    Returns (loss, per-head CE sums (K,), per-head target counts in this batch (K,)).
    """
    K, V = head_logits.shape[0], head_logits.shape[-1]
    ce = F.cross_entropy(
        head_logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(K, -1)
    counts = (targets.reshape(K, -1) != IGNORE_INDEX).sum(-1)
    ce_sums = ce.sum(-1)
    denom = (counts if token_counts is None else token_counts).clamp(min=1)
    loss = (ce_sums / denom * ce_sums.new_tensor(weights)).sum()
    return loss, ce_sums.detach(), counts


@torch.no_grad()
def topk_correct(head_logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """Per-head count of positions whose target is in the top-k: {k: (K,) counts}."""
    valid = targets != IGNORE_INDEX  # (K, B, T)
    top = head_logits.topk(max(ks), dim=-1).indices  # (K, B, T, maxk)
    hit = top == targets.unsqueeze(-1)
    return {k: (hit[..., :k].any(-1) & valid).flatten(1).sum(-1) for k in ks}
