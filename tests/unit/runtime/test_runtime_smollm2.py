"""The runtimes on the real default model (SmolLM2-135M-Instruct, untrained heads, an untrained
layer-subset draft): greedy == generate."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three uses of a paper clip.",
]


@pytest.fixture(scope="module")
def smollm2():
    from medusa_train.base_model import load_base_model, load_tokenizer
    from medusa_train.model import MedusaModel, build_heads

    base = load_base_model("smollm2-135m-instruct")
    heads = build_heads(base, "smollm2-135m-instruct", num_heads=4)
    return MedusaModel(base, heads).eval(), load_tokenizer("smollm2-135m-instruct")


def chat(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


@pytest.mark.parametrize("tree", ["autoregressive", "cpu_small", "mc_sim_7b_63"])
def test_greedy_identical_to_generate(smollm2, tree):
    from medusa_train.runtime import medusa_generate

    model, tokenizer = smollm2
    for text in PROMPTS:
        ids = chat(tokenizer, text)
        reference = model.base.generate(ids, do_sample=False, max_new_tokens=32)
        out = medusa_generate(model, ids, tree=tree, max_new_tokens=32)
        assert torch.equal(out.sequences, reference), (tree, text)


def test_greedy_batch_identical_to_generate(smollm2):
    from medusa_train.runtime import medusa_generate

    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in PROMPTS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    reference = model.base.generate(**batch, do_sample=False, max_new_tokens=32)
    out = medusa_generate(model, batch["input_ids"], batch["attention_mask"], tree="cpu_small", max_new_tokens=32)
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("gamma,truncated", [("auto", False), (3, True)])
def test_draft_decoding_identical_to_generate(smollm2, gamma, truncated):
    from omegaconf import OmegaConf

    from medusa_train.draft.build import build_draft
    from medusa_train.runtime.speculative import draft_generate

    model, tokenizer = smollm2
    draft = build_draft(model.base, OmegaConf.create({"init": "layers", "layers": [0, 10, 20, 29]}))
    vocab_map = torch.arange(0, model.config.vocab_size, 6) if truncated else None
    for text in PROMPTS:
        ids = chat(tokenizer, text)
        reference = model.base.generate(ids, do_sample=False, max_new_tokens=32)
        out = draft_generate(model.base, draft, ids, gamma=gamma, vocab_map=vocab_map, max_new_tokens=32)
        assert torch.equal(out.sequences, reference), (gamma, text)
