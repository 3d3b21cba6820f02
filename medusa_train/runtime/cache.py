"""The KV cache during tree decoding: one transformers DynamicCache, ragged rows.

Rows of a batch accept different numbers of tokens per step, so they fill the shared cache
to different lengths. Row b owns slots [start_b, length_b): `start_b` skips its left padding,
and slots from `length_b` up to the cache width S are holes left by rows that accepted more.
The 4-D mask hides pads and holes, and each row's position ids count its own real tokens
(so a row decodes exactly as it would alone). A step appends the T tree nodes at slots
[S, S + T) of every row; `keep` then moves each row's accepted nodes' keys/values (root
first) to [length_b, length_b + n_b) in place, and crops the cache to the longest row. The
accepted tokens are never re-run: their keys/values from the tree forward are already
those of the final sequence, since a node's position is root + depth.

Only the Cache's public surface is used: `update` through the model forward, each layer's
`keys` / `values` tensors (B, heads, S, head_dim), `crop` and `batch_select_indices`. The
cache is built without the model config, so sliding-window layers keep every slot and the
window lives in the mask instead.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class TreeKV:
    def __init__(self, cache: DynamicCache, start: torch.Tensor, length: torch.Tensor, config):
        self.cache = cache
        self.start = start  # (B,) first real slot of each row
        self.length = length  # (B,) end of each row's slots
        self.windows = layer_windows(config)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length()

    @property
    def plain(self) -> bool:
        """No pads, holes or windows: a one-token step sees every slot, as with no mask at all."""
        full = bool((self.start == 0).all()) and bool((self.length == self.width).all())
        return full and all(window is None for window in self.windows.values())

    def positions(self, depths: torch.Tensor) -> torch.Tensor:
        """(T,) node depths -> (B, T) position ids: each row's real-token count + depth."""
        return (self.length - self.start)[:, None] + depths

    def tree_mask(self, tree_mask: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        """Additive (B, 1, T, S + T) mask(s) for a forward of T nodes: own real slots + tree ancestors.

        Additive float (0 / dtype min), not bool: transformers adds a custom 4-D mask to the
        scores in eager attention, and sdpa takes either. A dict {layer type: mask} when the
        model mixes full and sliding-window layers; one tensor otherwise.
        """
        B, T = positions.shape
        slots = torch.arange(self.width, device=positions.device)  # (S,)
        context = (slots >= self.start[:, None]) & (slots < self.length[:, None])  # (B, S)
        seen = torch.cat([context[:, None].expand(B, T, -1), tree_mask.expand(B, T, T)], -1)  # (B, T, S+T)
        key_pos = torch.cat([slots - self.start[:, None], positions], -1)  # (B, S+T)
        masks = {}
        for kind, window in self.windows.items():
            allowed = seen if window is None else seen & (positions[:, :, None] - key_pos[:, None] < window)
            masks[kind] = torch.zeros(B, 1, T, allowed.shape[-1], dtype=dtype, device=positions.device).masked_fill_(
                ~allowed[:, None], torch.finfo(dtype).min
            )
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def keep(self, nodes: torch.Tensor, kept: torch.Tensor, num_nodes: int) -> None:
        """After a forward of `num_nodes` nodes: row b keeps nodes[b, :kept[b]] (root first), in order.

        nodes (B, A) node ids, entries past kept[b] may be anything valid (their copies land in
        the row's hole, past its new length).
        """
        B, A = nodes.shape
        steps = torch.arange(A, device=nodes.device)
        src = self.width - num_nodes + nodes  # (B, A)
        dst = self.length[:, None] + steps  # (B, A), dst <= src
        # Often (always, when only the root is kept in a full row) everything is in place already.
        if ((src != dst) & (steps < kept[:, None])).any():
            for layer in self.cache.layers:
                move_slots(layer.keys, src, dst)
                move_slots(layer.values, src, dst)
        self.length = self.length + kept
        self.crop()

    def crop(self) -> None:
        """Drop the slots past the longest row."""
        self.cache.crop(int(self.length.max()) - self.width)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows `index` (finished rows leave the batch)."""
        self.cache.batch_select_indices(index)
        self.start, self.length = self.start[index], self.length[index]
        self.crop()


def move_slots(states: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """states (B, heads, S, dim): slots src (B, A) -> slots dst (B, A), in place."""
    B, heads, _, dim = states.shape
    src, dst = (i[:, None, :, None].expand(B, heads, i.shape[1], dim) for i in (src, dst))
    states.scatter_(2, dst, states.gather(2, src))  # gather copies first: overlapping moves are safe


def layer_windows(config) -> dict[str, int | None]:
    """Attention layer type -> sliding window (None = full attention), read from the model config."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:  # e.g. Mistral: one window (or none) for every layer
        return {"full_attention": window}
    return {kind: window if "sliding" in kind else None for kind in dict.fromkeys(layer_types)}
