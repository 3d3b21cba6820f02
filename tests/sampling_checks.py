"""Statistical checks for exact sampling: the exact joint law of a model's first tokens, and a
chi-square z against it."""

from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


def exact_joint(base, prompt: torch.Tensor, temperature: float, top_p: float, vocab: int) -> torch.Tensor:
    """p(x1, x2, x3 | prompt) of plain sampling from an HF causal LM `base`, from full forwards and
    transformers' own warpers: (V, V, V)."""
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def next_probs(sequences):  # (N, L) -> (N, V)
        scores = base(sequences).logits[:, -1].float()
        for warp in warpers:
            scores = warp(sequences, scores)
        return scores.softmax(-1)

    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (V*V, 2)
    with torch.no_grad():
        p1 = next_probs(prompt)[0]  # (V,)
        p2 = next_probs(torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1))  # (V, V)
        p3 = next_probs(torch.cat([prompt.expand(vocab * vocab, -1), grid], 1)).view(vocab, vocab, vocab)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square as a standard normal z (Wilson-Hilferty); cells expecting < 5 pooled into one."""
    n = counts.sum()
    expected = probs.flatten().double() * n
    counts = counts.flatten().double()
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
