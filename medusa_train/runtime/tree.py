"""Medusa trees: a list of top-k index paths ("choices") -> the buffers one decode step needs.

Node 0 is the root: the token the base model produced last, not yet in the KV cache. A
choice [i_0, ..., i_{d-1}] is the node at depth d whose token is head d-1's proposal of
rank i_{d-1}, reached through the node [i_0, ..., i_{d-2}]. Head d-1 predicts the token d
places after the root (the base lm_head predicts 1 place after the token before the root,
which is the root), so every node sits at position root + depth.

The format is the FasterDecoding/Medusa repo's `medusa_choices.py`; nodes are numbered root
first, then the choices sorted by (depth, path), so each depth is a contiguous block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import torch

# FasterDecoding/Medusa `mc_sim_7b_63`: 63 nodes picked by simulated acceptance of Vicuna-7B heads.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
    [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1],
    [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3],
    [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0],
    [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]  # fmt: skip

TREES = {
    # One node: plain autoregressive decoding through the same runtime.
    "autoregressive": [],
    # Each head's top-1 only: the classic draft chain.
    "chain4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    # The 10 most valuable nodes of mc_sim_7b_63, for CPUs. SmolLM2-135M fp32, 1 thread: a
    # 1-node forward ~70 ms (matrix-vector products); 2-16 nodes ~1.7-2.1x that (MKL's
    # matrix-matrix path reads the weights about twice as slowly), 64 nodes ~3.5x.
    "cpu_small": MC_SIM_7B_63[:10],
    "mc_sim_7b_63": MC_SIM_7B_63,
}
DEFAULT_TREE = "cpu_small"


@dataclass(frozen=True, eq=False)
class Tree:
    choices: tuple[tuple[int, ...], ...]  # node i + 1 = choices[i]
    topk: int  # proposals taken from each head
    depth: int  # heads used = longest path
    mask: torch.Tensor  # (T, T) bool: node i sees node j iff j is i or an ancestor of i
    depths: torch.Tensor  # (T,) offset of each node's position from the root's
    parents: torch.Tensor  # (T,) parent node; the root points at itself
    proposal_index: torch.Tensor  # (T,) index into [root, head 0 top-k, head 1 top-k, ...]
    paths: torch.Tensor  # (C, depth + 1) root -> leaf node ids, padded with -1 (retrieve indices)
    path_len: torch.Tensor  # (C,) nodes on each path, root included
    internal: torch.Tensor  # (N,) nodes with children: the only ones whose logits verify anything
    internal_slot: torch.Tensor  # (T,) node -> row in `internal`, -1 for leaves

    @property
    def num_nodes(self) -> int:
        return len(self.choices) + 1

    def to(self, device: torch.device | str) -> "Tree":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})
        return Tree(**moved)


def resolve_tree(tree: "str | list | Tree | None", default: list | None = None) -> Tree:
    """A Tree, a name in TREES, or a choices list; None -> `default` (e.g. heads.config.tree) or DEFAULT_TREE."""
    if isinstance(tree, Tree):
        return tree
    if tree is None:
        tree = default if default is not None else DEFAULT_TREE
    if isinstance(tree, str):
        if tree not in TREES:
            raise ValueError(f"unknown tree {tree!r}: pass a choices list or one of {', '.join(TREES)}")
        tree = TREES[tree]
    return build_tree(tuple(tuple(int(i) for i in c) for c in tree))


@lru_cache(maxsize=32)
def build_tree(choices: tuple[tuple[int, ...], ...]) -> Tree:
    """Choices (hashable) -> CPU buffers; built once per distinct tree."""
    if len(choices) != len(set(choices)) or any(len(c) == 0 or min(c) < 0 for c in choices):
        raise ValueError("tree choices must be distinct, non-empty paths of non-negative top-k ranks")
    choices = tuple(sorted(choices, key=lambda c: (len(c), c)))
    node_of = {(): 0} | {c: i + 1 for i, c in enumerate(choices)}
    missing = [c for c in choices if c[:-1] not in node_of]
    if missing:
        raise ValueError(f"tree choices {missing[:3]} lack their parent path; every prefix must be a node")
    T = len(choices) + 1
    depth = max((len(c) for c in choices), default=0)
    topk = max((c[-1] for c in choices), default=-1) + 1

    paths_of = [()] + list(choices)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i, c in enumerate(paths_of):
        for d in range(len(c) + 1):
            mask[i, node_of[c[:d]]] = True
    parents = torch.tensor([0] + [node_of[c[:-1]] for c in choices])
    depths = torch.tensor([len(c) for c in paths_of])
    proposal_index = torch.tensor([0] + [1 + (len(c) - 1) * topk + c[-1] for c in choices])

    has_child = torch.zeros(T, dtype=torch.bool)
    has_child[parents[1:]] = True
    leaves = [c for i, c in enumerate(paths_of) if not has_child[i]]
    paths = torch.full((len(leaves), depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        paths[row, : len(leaf) + 1] = torch.tensor([node_of[leaf[:d]] for d in range(len(leaf) + 1)])
    internal = has_child.nonzero().flatten()
    internal_slot = torch.full((T,), -1, dtype=torch.long)
    internal_slot[internal] = torch.arange(len(internal))
    return Tree(
        choices=choices,
        topk=topk,
        depth=depth,
        mask=mask,
        depths=depths,
        parents=parents,
        proposal_index=proposal_index,
        paths=paths,
        path_len=(paths >= 0).sum(-1),
        internal=internal,
        internal_slot=internal_slot,
    )
