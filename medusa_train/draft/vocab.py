"""A draft's truncated vocabulary: the frequent-token subset it projects onto.

Stored next to the draft's HF files as `draft_vocab.safetensors` ({"vocab_map": int64 (V',)},
full-vocabulary ids sorted ascending). The draft keeps its full lm_head, so transformers
(assisted generation) ignores the file; our runtime projects onto `lm_head.weight[vocab_map]`
only, which is most of a small draft's per-token cost on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VOCAB_FILE = "draft_vocab.safetensors"


def save_vocab_map(folder: str | Path, vocab_map: torch.Tensor) -> None:
    vocab_map = vocab_map.to(torch.long).cpu()
    if vocab_map.ndim != 1 or not bool((vocab_map[1:] > vocab_map[:-1]).all()):
        raise ValueError("vocab_map must be a 1-D tensor of distinct full-vocabulary ids, sorted ascending")
    save_file({"vocab_map": vocab_map.contiguous()}, str(Path(folder) / VOCAB_FILE))


def load_vocab_map(folder: str | Path) -> torch.Tensor | None:
    """The saved map, or None when the draft projects onto the full vocabulary."""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        return None
    return load_file(str(path))["vocab_map"]
