"""The target's next-token distributions, top-k sparse, computed once and read memory-mapped.

Distilling a draft runs the frozen target over every training row; the target never
changes, so its distribution at each position can be stored once and reused by every later
epoch and every later run on the same data (another loss, layer choice or draft). For each
row only the positions that count (those predicting an assistant token,
losses.next_token_mask) are stored, in order: the target's greedy token over the full
vocabulary, and the top-k log-probs and ids of the distribution the loss compares against,
log_softmax(logits / temperature) over the full vocabulary or over a truncated one.

Layout, as training/hidden_cache.py (training/row_shards.py): each process writes its
share of `indices` to its own shard (`shard{s}_logprobs.npy` (P, k), `shard{s}_ids.npy` (P, k)
int32 full-vocabulary ids, `shard{s}_greedy.npy` (P,) int32, `shard{s}_index.npy` rows of
(row, offset, positions)); `meta.json`, written last and atomically, holds the key (model,
data, rows, k, dtype, temperature, vocabulary). A cache whose meta.json is missing or
carries another key is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_train.draft.losses import next_token_mask
from medusa_train.training.row_shards import build_shards, length_batches, padded, read_index, read_meta, span_offsets


def target_cache_key(model_name: str, dataset_fingerprint: str, top_k: int, dtype: str, temperature: float,
                     vocab_map: torch.Tensor | None = None, indices=None) -> str:
    vocab = None if vocab_map is None else hashlib.sha256(vocab_map.cpu().numpy().tobytes()).hexdigest()
    text = json.dumps(["draft-target-v1", model_name, dataset_fingerprint, top_k, dtype, float(temperature), vocab,
                       None if indices is None else list(indices)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TargetCache:
    """Read-only view: cache[row] -> ((P, k) float32 log-probs, (P, k) int64 ids, (P,) int64 greedy ids),
    P = the row's counted positions."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = read_meta(self.path)
        self.top_k = meta["top_k"]
        self.where = read_index(self.path, meta["num_shards"])  # row -> (shard, offset, positions)
        shards = range(meta["num_shards"])
        self.logprobs = [np.load(self.path / f"shard{s}_logprobs.npy", mmap_mode="r") for s in shards]
        self.ids = [np.load(self.path / f"shard{s}_ids.npy", mmap_mode="r") for s in shards]
        self.greedy = [np.load(self.path / f"shard{s}_greedy.npy", mmap_mode="r") for s in shards]

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, offset, length = self.where[row]
        span = slice(offset, offset + length)
        return (torch.from_numpy(np.array(self.logprobs[s][span], dtype=np.float32)),
                torch.from_numpy(np.array(self.ids[s][span], dtype=np.int64)),
                torch.from_numpy(np.array(self.greedy[s][span], dtype=np.int64)))

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, k) log-probs, (N, k) ids and (N,) greedy ids of rows `rows`, concatenated in
        order: the order of `tensor[mask]` for a (B, T) mask of those rows."""
        parts = [self[r] for r in rows]
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


@torch.no_grad()
def build_target_cache(
    path: Path,
    key: str,
    rows: list[list[int]],
    labels: list[list[int]],
    target_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    top_k: int,
    accelerator,
    temperature: float = 1.0,
    vocab_map: torch.Tensor | None = None,
    dtype: str = "float16",
    batch_tokens: int = 4096,
    desc: str = "caching target log-probs",
    indices: list[int] | None = None,
) -> TargetCache:
    """Run `target_logits(input_ids, attention_mask, keep) -> (N, V)` once over rows `indices`
    (default: all) and store, per counted position, the greedy id and the top-k of
    log_softmax(logits[:, vocab_map] / temperature) (vocab_map None: all of V)."""
    path = Path(path)

    def write_shard(mine: list[int]) -> None:
        _write_shard(path, accelerator.process_index, mine, rows, labels, target_logits, top_k, temperature, vocab_map,
                     np.dtype(dtype), accelerator.device, batch_tokens, desc, accelerator.is_local_main_process)

    meta = {"top_k": top_k, "rows": len(rows) if indices is None else len(indices), "dtype": dtype}
    build_shards(path, key, len(rows), indices, accelerator, write_shard, meta)
    return TargetCache(path)


def _write_shard(path, shard, mine, rows, labels, target_logits, top_k, temperature, vocab_map, np_dtype, device,
                 batch_tokens, desc, show):
    counted = [int(next_token_mask(torch.tensor([labels[i]])).sum()) for i in mine]
    total = sum(counted)
    offsets = span_offsets(counted)
    names = ("logprobs", "ids", "greedy")
    tmp = {n: path / f".shard{shard}_{n}.npy.tmp" for n in names}
    stores = {"logprobs": np.lib.format.open_memmap(tmp["logprobs"], mode="w+", dtype=np_dtype, shape=(total, top_k)),
              "ids": np.lib.format.open_memmap(tmp["ids"], mode="w+", dtype=np.int32, shape=(total, top_k)),
              "greedy": np.lib.format.open_memmap(tmp["greedy"], mode="w+", dtype=np.int32, shape=(total,))}
    index = np.zeros((len(mine), 3), dtype=np.int64)
    lengths = [len(rows[i]) for i in mine]
    bar = tqdm(total=sum(lengths), desc=desc, unit="tok", disable=not show)
    for batch in length_batches(lengths, batch_tokens):
        ids, mask = padded([rows[mine[j]] for j in batch])
        lab, _ = padded([labels[mine[j]] for j in batch], fill=-100)
        keep = next_token_mask(lab)  # (B, T)
        logits = target_logits(ids.to(device), mask.to(device), keep.to(device)).float()  # (N, V)
        greedy = logits.argmax(-1)  # (N,)
        if vocab_map is not None:
            logits = logits[:, vocab_map]  # (N, V')
        top = torch.log_softmax(logits / temperature, -1).topk(top_k, dim=-1)  # (N, k)
        top_ids = top.indices if vocab_map is None else vocab_map[top.indices]  # full-vocabulary ids
        values = {"logprobs": top.values.cpu().numpy(), "ids": top_ids.cpu().numpy(), "greedy": greedy.cpu().numpy()}
        n = 0
        for b, j in enumerate(batch):
            c = counted[j]
            for name in names:
                stores[name][offsets[j]:offsets[j] + c] = values[name][n:n + c]
            index[j] = (mine[j], offsets[j], c)
            n += c
        bar.update(sum(lengths[j] for j in batch))
    bar.close()
    for name in names:
        stores[name].flush()
    del stores
    for name in names:
        tmp[name].replace(path / f"shard{shard}_{name}.npy")
    np.save(path / f"shard{shard}_index.npy", index)
