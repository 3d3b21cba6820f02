"""Hardware-aware tree search: the Medusa paper's greedy tree construction, sized by measured latency.

Construction (Medusa paper, §3.3.3 "optimized tree construction"): a node is a path of
top-k ranks [i_0, ..., i_{d-1}] (head j's rank-i_j proposal at depth j + 1); its
probability p(node) is the chance that every token on its path is right. Nodes at one depth
are mutually exclusive (different tokens), so a tree accepts, per step, on average
    E[accepted length](tree) = 1 + sum over nodes of p(node)
tokens (the 1: the base model's own token, emitted every step). Starting from the root, the
search adds the node of highest p among those whose parent is already in the tree; since p
never grows along a path this gives, for every size n, the n - 1 nodes of highest p: the
best tree of that size. `greedy_nodes` returns them in the order they were added, so the
tree with n nodes (root included) is the first n - 1.

Budget: a bigger tree accepts more per step but each step costs more. The chosen size
maximises expected tokens per second, E[accepted length](n) / step latency(n), with the
latency measured on this device (latency.py), not tokens per step.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

Path_ = tuple[int, ...]


def greedy_nodes(prob: Callable[[Path_], float], num_heads: int, topk: int, max_nodes: int) -> list[tuple[Path_, float]]:
    """Up to max_nodes - 1 (path, p) in the order the greedy construction adds them.

    Ties go to the shallower, then lexicographically smaller path. Nodes with p = 0 are not
    added: they cost latency and accept nothing.
    """
    frontier = [(-prob((i,)), 1, (i,)) for i in range(topk)]
    heapq.heapify(frontier)
    chosen: list[tuple[Path_, float]] = []
    while frontier and len(chosen) < max_nodes - 1:
        neg_p, _, path = heapq.heappop(frontier)
        if -neg_p <= 0:
            break
        chosen.append((path, -neg_p))
        if len(path) < num_heads:
            for i in range(topk):
                child = path + (i,)
                heapq.heappush(frontier, (-prob(child), len(child), child))
    return chosen


def expected_accept_length(choices, prob: Callable[[Path_], float]) -> float:
    """Expected tokens per step of a tree: 1 (the base model's token) + sum of node probabilities."""
    return 1.0 + sum(prob(tuple(c)) for c in choices)


def num_internal(choices) -> int:
    """Nodes with children, the root included when there is any node."""
    paths = {tuple(c) for c in choices}
    return len({p[:-1] for p in paths}) if paths else 0


@dataclass
class SearchResult:
    num_nodes: int  # chosen tree size, root included
    choices: list[list[int]]  # the chosen tree
    expected_accept_length: float
    step_ms: float
    tokens_per_s: float
    curve: list[dict] = field(default_factory=list)  # per size n: expected length, latency, tokens/s

    def to_dict(self) -> dict:
        return {"num_nodes": self.num_nodes, "choices": self.choices,
                "expected_accept_length": round(self.expected_accept_length, 4), "step_ms": round(self.step_ms, 3),
                "tokens_per_s": round(self.tokens_per_s, 3), "curve": self.curve}


def choose_budget(expected: list[float], step_ms: list[float]) -> int:
    """Sizes n = 1..len(expected): expected[n-1] tokens per step, step_ms[n-1] ms per step ->
    the n with the most tokens per second (ties: the smaller n)."""
    if len(expected) != len(step_ms) or not expected:
        raise ValueError("need one latency per tree size")
    rates = [e / s for e, s in zip(expected, step_ms)]
    return max(range(len(rates)), key=lambda i: (rates[i], -i)) + 1


def search_tree(prob: Callable[[Path_], float], num_heads: int, topk: int,
                step_ms: Callable[[int, int], float], max_nodes: int) -> SearchResult:
    """Greedy trees of every size 1..max_nodes, each timed by step_ms(num_nodes, num_internal);
    returns the size with the highest expected tokens per second and the whole curve."""
    nodes = greedy_nodes(prob, num_heads, topk, max_nodes)
    expected, latency, curve = [], [], []
    for n in range(1, len(nodes) + 2):
        choices = [list(p) for p, _ in nodes[: n - 1]]
        e = 1.0 + sum(p for _, p in nodes[: n - 1])
        ms = step_ms(n, num_internal(choices) if n > 1 else 0)
        expected.append(e)
        latency.append(ms)
        curve.append({"num_nodes": n, "added": choices[-1] if choices else None, "p_added": round(nodes[n - 2][1], 5) if n > 1 else None,
                      "expected_accept_length": round(e, 4), "step_ms": round(ms, 3), "tokens_per_s": round(1000 * e / ms, 3)})
    best = choose_budget(expected, latency)
    return SearchResult(best, [list(p) for p, _ in nodes[: best - 1]], expected[best - 1], latency[best - 1],
                        1000 * expected[best - 1] / latency[best - 1], curve)
