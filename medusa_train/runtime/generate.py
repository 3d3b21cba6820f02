"""The Medusa decode loop: prefill, then one tree forward per step until every row stops.

State between steps, per row: the KV cache of every token before the root (cache.py), the
root (the last emitted token, not yet run) and the heads' top-k proposals made from the
hidden state that produced the root. A step

1. fills the tree from [root, head 0 top-k, head 1 top-k, ...] (tree.py),
2. runs the base decoder ONCE over the T nodes, with a 4-D tree mask and position ids
   root + depth appended to the cache,
3. projects only the internal nodes onto the vocabulary and lets the rule (acceptance.py)
   pick the longest accepted root-to-leaf prefix,
4. projects the last accepted node once more, now with the heads, which gives the token the
   base model adds after the accepted path (the next root) and the next proposals,
5. keeps the accepted nodes' keys/values in the cache and drops the rest.

Rows that hit EOS, a stop string or max_new_tokens leave the batch, so a finished row costs
nothing. The 1-node tree is plain autoregressive decoding through the same code.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from medusa_train.runtime.acceptance import Acceptance
from medusa_train.runtime.cache import TreeKV
from medusa_train.runtime.tree import Tree, resolve_tree


@dataclass
class DecodeStats:
    steps: int = 0  # tree forwards run (the prefill not counted)
    accept_lengths: list[list[int]] = field(default_factory=list)  # per row, per step: draft tokens accepted
    forwards: list[int] = field(default_factory=list)  # per row: base forwards it took part in, prefill included
    new_tokens: list[int] = field(default_factory=list)  # per row
    accepted_at_depth: list[int] = field(default_factory=list)  # per head k: row-steps where head k's token was kept
    time: dict[str, float] = field(default_factory=dict)  # seconds: prefill, forward, logits, other, total

    @property
    def tau(self) -> float:
        """Tokens emitted per base forward, the base model's own token included (plain decoding: 1)."""
        return sum(self.new_tokens) / max(sum(self.forwards), 1)

    @property
    def mean_accept_length(self) -> float:
        """Mean draft tokens accepted per step (tau - 1 without truncation at the end)."""
        lengths = [a for row in self.accept_lengths for a in row]
        return sum(lengths) / max(len(lengths), 1)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P + N) prompt, then new tokens right-padded with the pad id
    new_tokens: list[list[int]]
    stats: DecodeStats


@torch.no_grad()
def medusa_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tree: str | list | Tree | None = None,
    max_new_tokens: int = 128,
    acceptance: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    streamer=None,
    generator: torch.Generator | None = None,
) -> GenerateOutput:
    """Decode with Medusa heads and tree attention. `model` is a MedusaModel.

    input_ids (B, P), left-padded when rows differ in length (attention_mask marks real
    tokens). tree: a name in runtime.TREES, a choices list or a Tree; None = the heads'
    config tree, else runtime.DEFAULT_TREE. acceptance: "greedy" (identical to plain greedy
    decoding), "typical" (Medusa's typical acceptance) or "sample" (exact sampling at
    temperature / top_p). eos_token_id, pad_token_id: default the model's generation config.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, P = input_ids.shape
    if streamer is not None and B > 1:
        raise ValueError("a streamer takes one row: pass a batch of 1")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=")
    device = input_ids.device
    tree = resolve_tree(tree, model.heads.config.tree).to(device)
    if tree.depth > model.heads.num_heads:
        raise ValueError(f"the tree is {tree.depth} deep but the model has {model.heads.num_heads} heads")
    rule = Acceptance(acceptance, temperature, top_p, posterior_threshold, posterior_alpha, generator)
    eos = torch.tensor(eos_ids(model.base, eos_token_id), dtype=torch.long, device=device)
    stats = DecodeStats(accept_lengths=[[] for _ in range(B)], forwards=[0] * B, accepted_at_depth=[0] * tree.depth)
    clock = Clock(device)

    with clock.section("prefill"):
        kv, hidden = prefill(model, input_ids, attention_mask)
        logits, proposals = next_inputs(model, hidden, tree)  # (B, V), (D, B, k)
        root = rule.choose(logits)  # (B,)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    outputs: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # original row of each active row
    emitted, count = root[:, None], torch.ones(B, dtype=torch.long, device=device)
    while True:
        done = emit(emitted, count, rows, outputs, max_new_tokens, eos, stop_strings, tokenizer, streamer, stats)
        if done.all():
            break
        if done.any():
            active = (~done).nonzero().flatten()
            kv.select_rows(active)
            root, proposals = root[active], None if proposals is None else proposals[:, active]
            rows = [rows[i] for i in active.tolist()]
        emitted, accepted, root, proposals = decode_step(model, kv, tree, rule, root, proposals, clock)
        count = accepted + 1
        stats.steps += 1
        for i, a in zip(rows, accepted.tolist()):
            stats.accept_lengths[i].append(a)
        depth_hits = (accepted[:, None] > torch.arange(tree.depth, device=device)).sum(0).tolist()
        stats.accepted_at_depth = [s + h for s, h in zip(stats.accepted_at_depth, depth_hits)]

    if streamer is not None:
        streamer.end()
    stats.new_tokens = [len(o) for o in outputs]
    stats.time = dict(clock.totals, total=clock.elapsed())
    stats.time["other"] = stats.time["total"] - sum(clock.totals.values())
    width = max(stats.new_tokens)
    pad = pad_token_id if pad_token_id is not None else pad_id(model.base, eos.tolist())
    new = torch.full((B, width), pad, dtype=input_ids.dtype)
    for b, out in enumerate(outputs):
        new[b, : len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    return GenerateOutput(torch.cat([input_ids, new.to(device)], 1), outputs, stats)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Run the prompt into a fresh cache -> (TreeKV, last hidden state (B, 1, H))."""
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.sum(-1)  # (B,)
    start = P - real
    if not torch.equal(attention_mask.bool(), torch.arange(P, device=input_ids.device) >= start[:, None]):
        raise ValueError("medusa_generate needs left padding (pad tokens first, then each prompt)")
    if (real == 0).any():
        raise ValueError("every row needs at least one prompt token")
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as transformers' generate
    cache = DynamicCache()  # no config: every layer keeps every slot, windows live in our masks
    out = model.decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    kv = TreeKV(cache, start, torch.full_like(start, P), model.config)
    return kv, out.last_hidden_state[:, -1:]  # (B, 1, H)


def tree_forward(model, kv: TreeKV, tokens: torch.Tensor, tree: Tree) -> torch.Tensor:
    """Run tree node tokens (B, T) on top of the cache -> hidden states (B, T, H); appends T slots."""
    positions = kv.positions(tree.depths)  # (B, T)
    mask = None  # lets sdpa skip masking altogether (~5% of a 1-token forward on a CPU)
    if tree.num_nodes > 1 or not kv.plain:
        mask = kv.tree_mask(tree.mask, positions, model.lm_head.weight.dtype)  # (B, 1, T, S+T)
    out = model.decoder(
        input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=kv.cache, use_cache=True
    )
    return out.last_hidden_state


def next_inputs(model, hidden: torch.Tensor, tree: Tree):
    """Hidden state of each row's last token (B, 1, H) -> base logits (B, V), head proposals (D, B, k) or None."""
    if tree.depth == 0:  # no proposals to make: skip the heads
        return model.lm_head(hidden)[:, 0], None
    logits, head_logits = model.logits_from_hidden(hidden)  # (B, 1, V), (K, B, 1, V')
    top = head_logits[: tree.depth, :, 0].topk(tree.topk, -1).indices  # (D, B, k) head-vocab ids
    return logits[:, 0], model.heads.vocab_map[top]  # full-vocab ids


def decode_step(model, kv: TreeKV, tree: Tree, rule: Acceptance, root, proposals, clock):
    """One tree forward -> emitted (B, D+1), accepted (B,), next root (B,), next proposals (D, B, k).

    emitted[b, :accepted[b] + 1] are row b's new tokens: the accepted drafts, then the next root.
    """
    B, T = root.shape[0], tree.num_nodes
    pool = root[:, None] if proposals is None else torch.cat([root[:, None], proposals.permute(1, 0, 2).flatten(1)], 1)
    tokens = pool[:, tree.proposal_index]  # (B, T)
    with clock.section("forward"):
        hidden = tree_forward(model, kv, tokens, tree)  # (B, T, H)

    draws = None
    if T > 1:
        with clock.section("logits"):
            logits = project(model.lm_head, hidden[:, tree.internal])  # (B, N, V)
        ok, draws = rule.verify(logits, tokens, tree)  # (B, T), (B, N) or None
        path_ok = ok[:, tree.paths[:, 1:].clamp(min=0)] & (tree.paths[:, 1:] >= 0)  # (B, C, D)
        lengths = path_ok.long().cumprod(-1).sum(-1)  # (B, C)
        accepted, best = lengths.max(-1)  # (B,)
        nodes = tree.paths[best].clamp(min=0)  # (B, D+1)
    else:
        accepted = torch.zeros(B, dtype=torch.long, device=root.device)
        nodes = accepted[:, None]
    last = nodes.gather(1, accepted[:, None])[:, 0]  # (B,)

    with clock.section("logits"):
        logits, proposals = next_inputs(model, hidden[torch.arange(B, device=root.device), last][:, None], tree)
    slot = tree.internal_slot[last]  # (B,) -1 at leaves
    if draws is not None and (slot >= 0).all():
        next_root = draws.gather(1, slot[:, None])[:, 0]
    else:
        next_root = rule.choose(logits)
        if draws is not None:  # a sampling rule already drew at internal nodes: those draws decide
            next_root = torch.where(slot >= 0, draws.gather(1, slot.clamp(min=0)[:, None])[:, 0], next_root)

    kv.keep(nodes, accepted + 1, T)
    path_tokens = tokens.gather(1, nodes)  # (B, D+1) root first
    emitted = torch.cat([path_tokens[:, 1:], next_root[:, None]], 1).scatter_(1, accepted[:, None], next_root[:, None])
    return emitted, accepted, next_root, proposals


def project(lm_head, hidden: torch.Tensor) -> torch.Tensor:
    """(B, N, H) -> (B, N, V) through the base lm_head.

    A few rows on a CPU go as (W @ h^T)^T: MKL runs h @ W^T (what nn.Linear does) about 2x
    slower for 2-8 rows (SmolLM2's 49152x576 matrix: 4 rows 27 vs 15 ms), while both read W once.
    """
    B, N, H = hidden.shape
    if type(lm_head) is not torch.nn.Linear or hidden.device.type != "cpu" or not 1 < B * N <= 16:
        return lm_head(hidden)
    logits = (lm_head.weight @ hidden.reshape(B * N, H).T).T  # (B*N, V)
    if lm_head.bias is not None:
        logits = logits + lm_head.bias
    return logits.reshape(B, N, -1)


def emit(emitted, count, rows, outputs, max_new_tokens, eos, stop_strings, tokenizer, streamer, stats):
    """Append each active row's new tokens, cut at EOS / stop string / max_new_tokens -> done (B,) bool."""
    produced = torch.tensor([len(outputs[i]) for i in rows], device=count.device)
    count = torch.minimum(count, max_new_tokens - produced)
    in_range = torch.arange(emitted.shape[1], device=count.device) < count[:, None]
    is_eos = torch.isin(emitted, eos) & in_range  # (B, A)
    hit_eos = is_eos.any(-1)
    count = torch.where(hit_eos, is_eos.int().argmax(-1) + 1, count)
    done = hit_eos | (produced + count >= max_new_tokens)
    for i, (row, new, n) in enumerate(zip(rows, emitted.tolist(), count.tolist())):
        first = len(outputs[row])
        outputs[row].extend(new[:n])
        if stop_strings:
            end = stop_string_end(outputs[row], first, stop_strings, tokenizer)
            if end is not None:
                del outputs[row][end:]
                done[i] = True
        stats.forwards[row] += 1
        if streamer is not None:
            streamer.put(torch.tensor(outputs[row][first:]))
    return done


def stop_string_end(tokens: list[int], first_new: int, stop_strings: list[str], tokenizer) -> int | None:
    """Length of `tokens` up to the first new token that completes a stop string, or None."""
    span = max(len(s) for s in stop_strings) + 1  # tokens a stop string can touch (a token is >= 1 char)
    for end in range(first_new + 1, len(tokens) + 1):
        text = tokenizer.decode(tokens[max(0, end - span) : end])
        if any(s in text for s in stop_strings):
            return end
    return None


def eos_ids(base, eos_token_id) -> list[int]:
    """The EOS ids to stop on: the argument, else the base model's generation config, else its config."""
    if eos_token_id is None:
        generation_config = getattr(base, "generation_config", None)
        eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(base.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def pad_id(base, eos: list[int]) -> int:
    """Pad id for finished rows, as transformers' generate picks it: pad token, else the first EOS."""
    generation_config = getattr(base, "generation_config", None)
    for candidate in (getattr(generation_config, "pad_token_id", None), getattr(base.config, "pad_token_id", None)):
        if candidate is not None:
            return candidate
    return eos[0] if eos else 0


class Clock:
    """Wall time per named section; synchronises an accelerator so the times are real."""

    def __init__(self, device: torch.device, sections: tuple[str, ...] = ("prefill", "forward", "logits")):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = dict.fromkeys(sections, 0.0)
        self.begin = time.perf_counter()

    @contextmanager
    def section(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[name] += time.perf_counter() - start

    def elapsed(self) -> float:
        self.sync()
        return time.perf_counter() - self.begin
