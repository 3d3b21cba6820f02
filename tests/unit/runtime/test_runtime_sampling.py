"""Exact sampling: the runtime's first tokens follow the base model's distribution at (temperature, top_p)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from medusa_train.model import MedusaModel, build_heads
from medusa_train.runtime import medusa_generate

VOCAB, NEW, ROWS = 16, 3, 6000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box thread barriers stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peaked_model():
    """A 1-layer Llama over 16 tokens with a sharpened lm_head, so drafts are often right and acceptance matters.

    Smaller than the shared tiny model: thousands of rows are sampled at once.
    """
    torch.manual_seed(3)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    base = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(10)
    heads = build_heads(base, num_heads=4, lm_head="own")  # each head starts as a copy of the lm_head
    return MedusaModel(base, heads).eval()


def exact_joint(model, prompt, temperature, top_p):
    """p(x1, x2, x3 | prompt) of plain sampling, from full forwards and transformers' own warpers: (V, V, V)."""
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def next_probs(sequences):  # (N, L) -> (N, V)
        scores = model.base(sequences).logits[:, -1].float()
        for warp in warpers:
            scores = warp(sequences, scores)
        return scores.softmax(-1)

    grid = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # (V*V, 2)
    with torch.no_grad():
        p1 = next_probs(prompt)[0]  # (V,)
        p2 = next_probs(torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1))  # (V, V)
        p3 = next_probs(torch.cat([prompt.expand(VOCAB * VOCAB, -1), grid], 1)).view(VOCAB, VOCAB, VOCAB)
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


@pytest.mark.parametrize(
    "tree,temperature,top_p",
    [
        ([[0], [1], [2]], 1.0, 1.0),
        ("cpu_small", 0.8, 0.9),
        ([[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0]], 0.9, 0.95),
    ],
)
def test_sampling_matches_the_base_distribution(peaked_model, tree, temperature, top_p):
    prompt = torch.tensor([[1, 5, 9, 3, 12]])
    out = medusa_generate(
        peaked_model,
        prompt.expand(ROWS, -1),
        tree=tree,
        max_new_tokens=NEW,
        acceptance="sample",
        temperature=temperature,
        top_p=top_p,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(0),
    )
    tokens = out.sequences[:, -NEW:]
    counts = torch.zeros(VOCAB, VOCAB, VOCAB).index_put_(
        tuple(tokens.T), torch.ones(ROWS), accumulate=True
    )
    target = exact_joint(peaked_model, prompt, temperature, top_p)
    assert out.stats.mean_accept_length > 0.15  # drafts were accepted often: the tree path is what is tested
    assert chi_square_z(counts, target) < 4.5
    # The same statistic has the power to see a small change of temperature.
    assert chi_square_z(counts, exact_joint(peaked_model, prompt, temperature * 1.25, top_p)) > 6
