"""Distillation losses between a draft's and the target's next-token distributions.

    fkl  forward KL(p || q): the draft covers everything the target might say (mean-seeking)
    rkl  reverse KL(q || p): the draft concentrates on the target's modes (mode-seeking)
    tvd  total variation 0.5 * sum |p - q|, in [0, 1]; 1 - TVD is the expected acceptance
         rate of one speculative-sampling step (DistillSpec)
    ce   cross-entropy on the target's greedy token: what greedy verification checks

p is the target, q the draft, both softmax(logits / temperature) (no T^2 rescaling, so TVD
stays a probability). Losses are per position, shape (N,); the recipe sums them over the
positions that count and divides by the global count, so any split over micro-batches and
processes gives one big batch's gradient.

Sparse variants take the target as its top-k log-probs and ids (a disk cache) and compare
both distributions over those k tokens plus one "any other token" outcome: zero when the
draft equals the target, never more than the dense loss, equal to it when k = V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medusa_train.loss import IGNORE_INDEX

LOSSES = ("fkl", "rkl", "tvd", "ce")


def check_loss(kind: str, temperature: float) -> None:
    if kind not in LOSSES:
        raise ValueError(f"draft.loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"draft.temperature must be > 0, got {temperature}")


def per_token_loss(kind: str, draft_logits: torch.Tensor, target_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """(N, V) draft and target logits -> (N,) losses."""
    check_loss(kind, temperature)
    q_log = F.log_softmax(draft_logits.float() / temperature, dim=-1)  # (N, V)
    if kind == "ce":
        return F.nll_loss(q_log, target_logits.argmax(-1), reduction="none")
    p_log = F.log_softmax(target_logits.float() / temperature, dim=-1)  # (N, V)
    return _divergence(kind, q_log, p_log)


def sparse_per_token_loss(kind: str, draft_logits: torch.Tensor, target_logprobs: torch.Tensor,
                          target_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) draft logits, (N, k) target log-probs (already at `temperature`, normalised over
    V) and their ids into V -> (N,) losses.

    Both distributions are coarsened to k + 1 outcomes, the target's top-k tokens and "any
    other token", and compared there: 0 when the draft equals the target, a lower bound of
    the dense divergence otherwise, equal to it when k = V. ce takes the target's top token.
    """
    check_loss(kind, temperature)
    q_log = F.log_softmax(draft_logits.float() / temperature, dim=-1)  # (N, V)
    q_top = q_log.gather(-1, target_ids)  # (N, k)
    p_top = target_logprobs.float()  # (N, k)
    if kind == "ce":
        return -q_top.gather(-1, p_top.argmax(-1, keepdim=True)).squeeze(-1)
    p_all = torch.cat([p_top, _rest(p_top)], dim=-1)  # (N, k + 1)
    q_all = torch.cat([q_top, _rest(q_top)], dim=-1)  # (N, k + 1)
    return _divergence(kind, q_all, p_all)


def _rest(top_log: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """(N, k) log-probs -> (N, 1) log of the mass outside them; the floor absorbs rounding
    when the k tokens hold it all (k = V), where the term then vanishes."""
    return torch.log((1 - top_log.exp().sum(-1, keepdim=True)).clamp(min=floor))


def _divergence(kind: str, q_log: torch.Tensor, p_log: torch.Tensor) -> torch.Tensor:
    if kind == "fkl":
        return _xlogx_ratio(p_log, q_log).sum(-1)
    if kind == "rkl":
        return _xlogx_ratio(q_log, p_log).sum(-1)
    return 0.5 * (p_log.exp() - q_log.exp()).abs().sum(-1)  # tvd


def _xlogx_ratio(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) elementwise, 0 where a = 0 (also when b = 0 there).

    The -inf entries are replaced before the product, not after: torch.where would pass a
    NaN gradient from the branch it did not pick.
    """
    live = a_log > float("-inf")
    a_log, b_log = a_log.masked_fill(~live, 0.0), b_log.masked_fill(~live, 0.0)
    return torch.where(live, a_log.exp() * (a_log - b_log), torch.zeros_like(a_log))


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) bool: position t counts when the token it predicts, t + 1, is labelled
    (an assistant token)."""
    nxt = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return nxt != IGNORE_INDEX


def distill_loss(kind: str, draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean loss over the positions that predict an assistant token.

    draft_logits, target_logits (B, T, V) from the same input; labels (B, T) with IGNORE_INDEX
    on prompt and padding tokens.
    """
    keep = next_token_mask(labels)  # (B, T)
    losses = per_token_loss(kind, draft_logits[keep], target_logits[keep], temperature)  # (N,)
    return losses.sum() / keep.sum().clamp(min=1)
