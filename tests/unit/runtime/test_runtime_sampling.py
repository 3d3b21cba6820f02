"""Exact sampling: the runtime's first tokens follow the base model's distribution at (temperature, top_p)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from medusa_train.model import MedusaModel, build_heads
from medusa_train.runtime import medusa_generate
from tests.sampling_checks import chi_square_z, exact_joint

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, NEW, ROWS = 16, 3, 6000


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
    target = exact_joint(peaked_model.base, prompt, temperature, top_p, VOCAB)
    assert out.stats.mean_accept_length > 0.15  # drafts were accepted often: the tree path is what is tested
    assert chi_square_z(counts, target) < 4.5
    # The same statistic has the power to see a small change of temperature.
    assert chi_square_z(counts, exact_joint(peaked_model.base, prompt, temperature * 1.25, top_p, VOCAB)) > 6
