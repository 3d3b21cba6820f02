"""Distillation losses: zero at equality, bounds, temperature, masking, sparse = dense at k = V."""

from __future__ import annotations

import pytest
import torch

from medusa_train.draft.losses import (
    LOSSES,
    distill_loss,
    next_token_mask,
    per_token_loss,
    sparse_per_token_loss,
)

torch.manual_seed(0)
V = 40


def logits(n=6, scale=3.0, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_divergences_vanish_at_equality_and_are_positive_otherwise(kind):
    t = logits()
    assert per_token_loss(kind, t, t).abs().max() < 1e-5
    assert (per_token_loss(kind, logits(seed=1), t) > 1e-3).all()


def test_ce_is_the_cross_entropy_on_the_target_argmax():
    t, d = logits(), logits(seed=1)
    expected = torch.nn.functional.cross_entropy(d, t.argmax(-1), reduction="none")
    torch.testing.assert_close(per_token_loss("ce", d, t), expected)
    assert (per_token_loss("ce", d, t) > 0).all()


def test_tvd_is_in_zero_one():
    t, d = logits(scale=10), logits(scale=10, seed=1)
    tvd = per_token_loss("tvd", d, t)
    assert ((tvd >= 0) & (tvd <= 1)).all() and tvd.max() > 0.5


def test_temperature_applies_to_both():
    t, d = logits(), logits(seed=1)
    torch.testing.assert_close(per_token_loss("fkl", d, t, temperature=2.0), per_token_loss("fkl", d / 2, t / 2))
    # A higher temperature flattens both distributions: they grow closer.
    assert per_token_loss("fkl", d, t, temperature=4.0).mean() < per_token_loss("fkl", d, t).mean()


def test_only_positions_predicting_assistant_tokens_count():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    t = torch.randn(2, 5, V)
    d = t.clone()
    keep = next_token_mask(labels)
    d[~keep] = torch.randn(int((~keep).sum()), V)  # wrong only where nothing counts
    for kind in LOSSES:
        if kind != "ce":
            assert distill_loss(kind, d, t, labels) < 1e-5
    d[0, 1] = torch.randn(V)
    assert distill_loss("fkl", d, t, labels) > 1e-3


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_sparse_equals_dense_when_k_is_the_vocabulary(kind, temperature):
    t, d = logits(), logits(seed=1).requires_grad_(True)
    top = torch.log_softmax(t / temperature, -1).topk(V, -1)
    dense = per_token_loss(kind, d, t, temperature)
    sparse = sparse_per_token_loss(kind, d, top.values, top.indices, temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    (g_dense,) = torch.autograd.grad(dense.sum(), d)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), d)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_sparse_vanishes_at_equality_and_bounds_dense_from_below(kind):
    t, d = logits(), logits(seed=1)
    top = torch.log_softmax(t, -1).topk(8, -1)
    assert sparse_per_token_loss(kind, t, top.values, top.indices).abs().max() < 1e-5
    sparse = sparse_per_token_loss(kind, d, top.values, top.indices)
    assert (sparse > 0).all() and (sparse <= per_token_loss(kind, d, t) + 1e-5).all()


def test_unknown_loss_and_bad_temperature_fail():
    with pytest.raises(ValueError, match="draft.loss must be one of"):
        per_token_loss("kl", logits(), logits())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        per_token_loss("fkl", logits(), logits(), temperature=0)
