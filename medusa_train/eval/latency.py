"""What one decode step costs on this device, as a function of the tree: the hardware side of the tree search.

A Medusa step with a tree of n nodes, N of them internal, costs
    forward(n)      the base decoder over n tree tokens on top of a cache of `context_len` tokens
  + lm_head(N)      base logits at the internal nodes (they verify the children)
  + next            base logits and heads' proposals at the last accepted node (one row)
  + overhead        the runtime's bookkeeping (masks, acceptance, cache moves)
and a 1-node tree (plain decoding) costs forward(1) + lm_head(1) + overhead. `profile_latency`
measures forward(n) for n = 1..max_nodes, lm_head(m) and `next` with the runtime's own
tree forward; `calibrate_overhead` times whole runtime steps and keeps what the parts miss.

Sizes are timed in a shuffled order on every repeat and the median kept, so drift on a
shared machine spreads over all sizes instead of tilting the curve. The search uses the
medians made non-decreasing in n (isotonic fit): more tokens never cost less, and a lucky
quiet moment at one size must not pick the tree.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from medusa_train.runtime import build_tree, medusa_generate, resolve_tree


@dataclass
class LatencyProfile:
    context_len: int
    forward_ms: list[float]  # [n - 1]: decoder forward of n tree tokens
    lm_head_ms: list[float]  # [m - 1]: base lm_head on m rows
    next_ms: float  # base logits + heads' proposals for one node
    # Runtime bookkeeping per step (calibrate_overhead): overhead_ms + overhead_ms_per_node * (n - 1).
    overhead_ms: float = 0.0
    overhead_ms_per_node: float = 0.0
    device: str = ""
    threads: int = 0
    calibration: list[dict] = field(default_factory=list)

    @property
    def max_nodes(self) -> int:
        return len(self.forward_ms)

    def step_ms(self, num_nodes: int, num_internal: int) -> float:
        """Predicted wall time of one decode step with a tree of num_nodes nodes, num_internal internal."""
        if not 1 <= num_nodes <= self.max_nodes:
            raise ValueError(f"profiled 1..{self.max_nodes} nodes, asked for {num_nodes}")
        forward, lm_head = isotonic(self.forward_ms), isotonic(self.lm_head_ms)
        overhead = self.overhead_ms + self.overhead_ms_per_node * (num_nodes - 1)
        if num_nodes == 1:
            return forward[0] + lm_head[0] + overhead
        head_ms = lm_head[num_internal - 1] if num_internal else 0.0
        return forward[num_nodes - 1] + head_ms + self.next_ms + overhead

    def tree_step_ms(self, choices) -> float:
        tree = build_tree(tuple(tuple(c) for c in choices))
        return self.step_ms(tree.num_nodes, len(tree.internal) if tree.num_nodes > 1 else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("forward_ms", "lm_head_ms"):
            d[key] = [round(x, 3) for x in d[key]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyProfile":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(n)]


def star_tree(num_nodes: int):
    """A tree of num_nodes nodes (root + depth-1 children): the forward cost depends on the count only."""
    return build_tree(tuple((i,) for i in range(num_nodes - 1)))


def _timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


@torch.no_grad()
def profile_latency(model, context_len: int = 256, max_nodes: int = 64, repeats: int = 5, seed: int = 0,
                    progress: bool = True) -> LatencyProfile:
    """Median wall times (ms) of the runtime's tree forward for 1..max_nodes tokens, of the base
    lm_head for 1..max_nodes rows and of the next-step projection (heads included)."""
    from medusa_train.runtime.generate import prefill, tree_forward

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm_head.weight.shape[0]
    prompt = torch.randint(3, vocab, (1, context_len), generator=g).to(device)
    kv, hidden = prefill(model, prompt, None)
    trees = {n: star_tree(n).to(device) for n in range(1, max_nodes + 1)}
    tokens = torch.randint(3, vocab, (1, max_nodes), generator=g).to(device)
    rows = torch.randn(1, max_nodes, hidden.shape[-1], generator=g).to(device, hidden.dtype)

    def forward(n: int) -> None:
        tree_forward(model, kv, tokens[:, :n], trees[n])
        kv.cache.crop(-n)  # back to context_len

    rng = random.Random(seed)
    forward_times = {n: [] for n in trees}
    head_times = {n: [] for n in trees}
    next_times = []
    forward(min(8, max_nodes)), model.lm_head(rows), model.logits_from_hidden(hidden)  # warm-up
    for _ in tqdm(range(repeats), desc="latency profile", disable=not progress, leave=False):
        sizes = list(trees)
        rng.shuffle(sizes)
        for n in sizes:
            forward_times[n].append(_timed(lambda: forward(n), sync))
            head_times[n].append(_timed(lambda: model.lm_head(rows[:, :n]), sync))
        next_times.append(_timed(lambda: model.logits_from_hidden(hidden), sync))
    return LatencyProfile(
        context_len=context_len,
        forward_ms=[statistics.median(forward_times[n]) for n in trees],
        lm_head_ms=[statistics.median(head_times[n]) for n in trees],
        next_ms=statistics.median(next_times),
        device=str(device) if device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        threads=torch.get_num_threads(),
    )


@torch.no_grad()
def calibrate_overhead(model, profile: LatencyProfile, prompt: torch.Tensor, trees: list, max_new_tokens: int = 48,
                       repeats: int = 2) -> LatencyProfile:
    """Time whole runtime steps (DecodeStats.time, prefill excluded) for a few trees on `prompt`;
    fit (measured step - predicted parts) = overhead_ms + overhead_ms_per_node * (n - 1), both >= 0."""
    gaps, sizes, rows = [], [], []
    profile.overhead_ms = profile.overhead_ms_per_node = 0.0
    for rep in range(repeats):
        for choices in trees if rep % 2 == 0 else trees[::-1]:
            tree = resolve_tree(choices)
            out = medusa_generate(model, prompt, tree=tree, max_new_tokens=max_new_tokens)
            s = out.stats
            if s.steps == 0:
                continue
            measured = (s.time["total"] - s.time["prefill"]) * 1000 / s.steps
            predicted = profile.step_ms(tree.num_nodes, len(tree.internal) if tree.num_nodes > 1 else 0)
            gaps.append(measured - predicted)
            sizes.append(tree.num_nodes - 1)
            rows.append({"num_nodes": tree.num_nodes, "steps": s.steps, "measured_step_ms": round(measured, 3),
                         "predicted_parts_ms": round(predicted, 3)})
    profile.overhead_ms, profile.overhead_ms_per_node = fit_overhead(sizes, gaps)
    profile.calibration = rows
    return profile


def fit_overhead(extra_nodes: list[int], gaps: list[float]) -> tuple[float, float]:
    """Least-squares line gap = a + b * extra_nodes with a, b >= 0 (one size: the median gap, b = 0)."""
    if not gaps:
        return 0.0, 0.0
    mx, mg = statistics.fmean(extra_nodes), statistics.fmean(gaps)
    var = sum((x - mx) ** 2 for x in extra_nodes)
    slope = max(sum((x - mx) * (g - mg) for x, g in zip(extra_nodes, gaps)) / var, 0.0) if var else 0.0
    if slope == 0.0:
        return max(statistics.median(gaps), 0.0), 0.0
    intercept = mg - slope * mx
    if intercept < 0:  # through the origin instead
        slope = max(sum(x * g for x, g in zip(extra_nodes, gaps)) / max(sum(x * x for x in extra_nodes), 1e-9), 0.0)
        intercept = 0.0
    return intercept, slope
