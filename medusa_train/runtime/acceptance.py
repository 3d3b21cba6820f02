"""Acceptance rules: which tree nodes the base model agrees with, and which token it adds.

A rule sees the base logits at the tree's internal nodes only (a node's logits judge its
children; a leaf judges nothing) and says, per node, whether its token is accepted given its
parent. The runtime then keeps the longest root-to-leaf prefix of accepted nodes.

greedy   A child is accepted iff it is its parent's argmax: the output is token for token
         plain greedy decoding.
typical  Medusa paper §2.3.1: a child x is accepted iff p(x) > min(threshold, alpha * exp(-H(p))),
         p the parent's distribution at `temperature`. Faster than exact sampling, not exact.
sample   Exact: the output is distributed as the base model's at (temperature, top_p).
         The heads' tokens are a deterministic top-k, so each draft is a point mass q = δ_x and
         `accept with min(1, p(x) / q(x))` against the heads' softmax would be wrong. Tree
         rejection sampling with point-mass drafts is: walk the children in order, accept
         child x with probability r(x), r the residual (at first p); on rejection set r(x) = 0
         and renormalise; if all are rejected, sample r. Child x_i is then taken with
         probability p(x_i) and a non-child y comes out with probability p(y): the scheme is
         one draw y ~ p followed by "go to the child whose token is y, if any". We run it in
         that form, vectorised: one independent draw y_u ~ p_u at every internal node u, a
         child is accepted iff its token equals its parent's draw, and the token added after
         the accepted path is the draw at its last node (a leaf draws from its own logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa_train.runtime.tree import Tree

RULES = ("greedy", "typical", "sample")


@dataclass
class Acceptance:
    rule: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"acceptance must be one of {RULES}, got {self.rule!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.temperature == 0:  # the limit of both sampling rules
            self.rule = "greedy"

    @property
    def draws_tokens(self) -> bool:
        """Whether `verify` returns per-node draws that fix the token after the accepted path."""
        return self.rule != "typical"

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (...) next tokens under this rule."""
        if self.rule == "greedy":
            return logits.argmax(-1)
        if self.rule == "sample":
            probs = self.probs(logits)
        else:
            scores = logits.float() / self.temperature
            probs = scores.softmax(-1)
            keep = probs >= typical_threshold(probs, self.posterior_threshold, self.posterior_alpha)[..., None]
            keep.scatter_(-1, probs.argmax(-1, keepdim=True), True)
            probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> the distribution exact sampling draws from (temperature, then top_p)."""
        return top_p_filter(logits.float() / self.temperature, self.top_p).softmax(-1)

    def verify(self, logits: torch.Tensor, tokens: torch.Tensor, tree: Tree):
        """Internal-node logits (B, N, V), node tokens (B, T) -> accepted (B, T) bool, draws (B, N) or None."""
        parent_slot = tree.internal_slot[tree.parents]  # (T,) row of each node's parent in `logits`
        if self.rule == "typical":
            probs = (logits.float() / self.temperature).softmax(-1)  # (B, N, V)
            threshold = typical_threshold(probs, self.posterior_threshold, self.posterior_alpha)  # (B, N)
            flat = parent_slot * probs.shape[-1] + tokens  # (B, T) index into (N * V)
            return probs.flatten(1).gather(1, flat) > threshold[:, parent_slot], None
        draws = self.choose(logits)  # (B, N)
        return tokens == draws[:, parent_slot], draws


def typical_threshold(probs: torch.Tensor, threshold: float, alpha: float) -> torch.Tensor:
    """(..., V) probs -> (...) min(threshold, alpha * exp(-entropy)), as in the Medusa repo."""
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    return torch.clamp(alpha * torch.exp(-entropy), max=threshold)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with transformers' TopPLogitsWarper semantics (at least one token kept)."""
    if top_p >= 1:
        return scores
    sorted_scores, order = scores.sort(-1)  # ascending
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
