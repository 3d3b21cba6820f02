"""Tiny heads and run folders for the export tests; no downloads."""

from __future__ import annotations

import json

import torch

from medusa_train.model import build_heads

NUM_HEADS, NUM_LAYERS, HIDDEN, VOCAB, TRUNCATED = 3, 2, 64, 256, 100

def make_heads(base, lm_head="shared", truncated=False, num_layers=NUM_LAYERS, base_name="tiny", seed=1, vocab_map=None):
    """Heads with every weight moved off its (zero / base-copy) initialisation."""
    kwargs = dict(num_heads=NUM_HEADS, num_layers=num_layers, lm_head=lm_head)
    if truncated:
        g = torch.Generator().manual_seed(seed)
        vocab_map = vocab_map if vocab_map is not None else torch.randperm(VOCAB, generator=g)[:TRUNCATED].sort().values
        kwargs.update(truncated_vocab_size=vocab_map.numel(), vocab_map=vocab_map)
    heads = build_heads(base, base_name, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return heads.eval()


def make_run(root, base, base_dir, lm_head="shared", truncated=False, extras=True):
    """A training run folder: heads/ plus, with extras, train_summary.json, .hydra/config.yaml, eval/."""
    heads = make_heads(base, lm_head, truncated, base_name=str(base_dir))
    heads.config.tree = [[0], [1], [0, 0], [0, 0, 0]]
    heads.save_pretrained(root / "heads")
    if extras:
        summary = {
            "recipe": "medusa1", "base_model": str(base_dir), "heads_dir": str(root / "heads"), "num_heads": NUM_HEADS,
            "steps": 10, "time_s": 3723.4, "train_loss": [2.0, 1.5, 1.2],
            "eval_final": {"tokens": 500, "top1": [0.61, 0.42, 0.3], "top5": [0.8, 0.66, 0.52]},
        }
        (root / "train_summary.json").write_text(json.dumps(summary))
        (root / ".hydra").mkdir()
        (root / ".hydra" / "config.yaml").write_text(
            f"model:\n  name_or_path: {base_dir}\ndata:\n  sources:\n  - data/default_train.jsonl\n  format: auto\n"
            "  max_length: 512\ntrain:\n  max_steps: 10\n  micro_batch_size: 8\n  grad_accum_steps: 1\n  lr: 0.001\n"
            "  lr_scheduler: cosine\nrecipe:\n  name: medusa1\n"
        )
        (root / "eval").mkdir()
        (root / "eval" / "results.json").write_text(json.dumps({"accept_len": 1.84, "tokens_per_s": 41.5}))
        (root / "eval" / "speedup.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return heads
