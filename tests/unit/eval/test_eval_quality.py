"""Backbone quality: agreement and perplexity of a tuned model against the original."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from medusa_train.eval.quality import argmax_agreement, backbone_quality, common_prefix_fraction, perplexity
from medusa_train.loss import IGNORE_INDEX
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_common_prefix_fraction():
    assert common_prefix_fraction([1, 2, 3, 4], [1, 2, 3, 4], 1) == 1.0
    assert common_prefix_fraction([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], 1) == 0.25
    assert common_prefix_fraction([1, 2, 3], [1, 2, 3, 7], 1) == 1.0  # the original answer fully reproduced
    assert common_prefix_fraction([1, 2, 3], [1, 2], 1) == 0.5


def test_agreement_and_perplexity_by_hand():
    model = tiny_model("llama", seed=0)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, 10], [IGNORE_INDEX, 12, 13]]
    with torch.no_grad():
        logits = [model(torch.tensor([r])).logits[0] for r in rows]
    # Position t predicts token t+1: the labelled tokens are 7, 8, 9, 10 (row 0) and 12, 13 (row 1).
    picks = [(logits[0], [1, 2, 3, 4], [7, 8, 9, 10]), (logits[1], [0, 1], [12, 13])]
    nll = sum(float(torch.nn.functional.cross_entropy(lg[pos], torch.tensor(t), reduction="sum"))
              for lg, pos, t in picks)
    hits = sum(int((lg[pos].argmax(-1) == torch.tensor(t)).sum()) for lg, pos, t in picks)
    assert perplexity(model, rows, labels, batch_size=2, progress=False) == pytest.approx(torch.tensor(nll / 6).exp().item(), rel=1e-4)
    assert argmax_agreement(model, rows, labels, batch_size=1, progress=False) == hits / 6


def test_backbone_quality(tmp_path, tiny_model_dir, smol_tokenizer):
    from medusa_train.base_model import load_base_model

    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}."},
                          {"role": "assistant", "content": f"{i} is a number."}]} for i in range(24)]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        f"data:\n  sources: [{tmp_path / 'conv.jsonl'}]\n  eval_fraction: 0.25\n")
    heads_path = tmp_path / "run" / "heads"
    original = load_base_model(str(tiny_model_dir))
    same = backbone_quality(original, copy.deepcopy(original), smol_tokenizer, heads_path, num_prompts=4,
                            max_new_tokens=6, batch_size=2, progress=False)
    assert same["prompts"] == 4 and same["answer_tokens"] > 0
    assert same["teacher_forced_agreement"] == same["original_self_agreement"] == 1.0
    assert same["identical_answers"] == same["common_prefix_fraction"] == 1.0
    assert same["perplexity_tuned"] == pytest.approx(same["perplexity_original"])

    tuned = copy.deepcopy(original)
    with torch.no_grad():
        for p in tuned.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    changed = backbone_quality(original, tuned, smol_tokenizer, heads_path, num_prompts=4, max_new_tokens=6,
                               batch_size=2, progress=False)
    assert changed["teacher_forced_agreement"] < 1.0
    assert changed["perplexity_tuned"] != pytest.approx(changed["perplexity_original"])
