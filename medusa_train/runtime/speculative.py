"""Speculative decoding with a draft model: the draft proposes, the target verifies.

`draft_generate(target, draft, input_ids)`, one sequence at a time. Both models keep a KV
cache holding every token but the last emitted one (the root). A round

1. runs the draft over the tokens it has not seen yet (the root, and the last draft when
   every draft was kept) and lets it propose gamma tokens one at a time: its argmax, or a
   draw from its own distribution q at (temperature, top_p) when sampling;
2. runs the target ONCE over [root, d_1 .. d_gamma], which gives its distribution p at every
   draft and one more;
3. keeps drafts with `accept_drafts`: greedy keeps those equal to the target's argmax, then
   adds the target's token; sampling keeps d_i with probability min(1, p_i(d_i) / q_i(d_i)),
   replaces the first rejected one by a draw from norm(max(0, p_i - q_i)) and stops, or adds
   a draw from p_{gamma+1} when all were kept (Leviathan et al. 2023; Chen et al. 2023), so
   every token has exactly the target's distribution whatever the draft proposes;
4. crops both caches to the kept tokens: nothing is re-run.

gamma="auto" picks each round's gamma from what this decode has measured so far (`GammaController`):
the acceptance rate, the draft's time per token and the target's time per verification size.
gamma = 0, a plain target step, is a candidate, so a draft that does not pay for itself on
this hardware is switched off rather than slowing decoding down.

A draft with a truncated vocabulary (draft/vocab.py) projects onto its frequent-token
subset only, the bulk of a small draft's cost otherwise; its q is zero elsewhere, which the
rejection rule handles like any other q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from medusa_train.runtime.acceptance import Acceptance
from medusa_train.runtime.generate import (
    Clock,
    DecodeStats,
    GenerateOutput,
    emit,
    eos_ids,
    project,
)

MAX_GAMMA = 8


@dataclass
class SpeculativeStats(DecodeStats):
    gammas: list[int] = field(default_factory=list)  # drafts proposed in each round

    @property
    def acceptance_rate(self) -> float:
        """Drafts kept / drafts proposed."""
        proposed = sum(self.gammas)
        return sum(a for row in self.accept_lengths for a in row) / proposed if proposed else 0.0


@torch.no_grad()
def draft_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gamma: int | str = "auto",
    max_gamma: int = MAX_GAMMA,
    vocab_map: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    acceptance: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    streamer=None,
    generator: torch.Generator | None = None,
) -> GenerateOutput:
    """Decode one prompt (1, P) with `target` (any HF causal LM) and a `draft` sharing its tokenizer.

    gamma: drafts per round, or "auto" (chosen per round, 0..max_gamma). vocab_map: the
    draft's truncated vocabulary (full ids, draft.vocab.load_vocab_map), or None.
    acceptance: "greedy" (identical to the target's greedy decoding) or "sample" (exact
    sampling at temperature / top_p). Returns GenerateOutput with SpeculativeStats.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"draft_generate decodes one sequence at a time, got a batch of {input_ids.shape[0]}")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("draft_generate takes an unpadded prompt (attention_mask all ones)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if acceptance not in ("greedy", "sample"):
        raise ValueError(f"acceptance must be 'greedy' or 'sample' for draft decoding, got {acceptance!r}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=")
    check_vocabularies(target, draft, vocab_map)
    rule = Acceptance(acceptance, temperature, top_p, generator=generator)
    controller = GammaController(gamma, max_gamma)
    device = input_ids.device
    eos = torch.tensor(eos_ids(target, eos_token_id), dtype=torch.long, device=device)
    stats = SpeculativeStats(accept_lengths=[[]], forwards=[0], accepted_at_depth=[0] * controller.max_gamma)
    clock = Clock(device, sections=("prefill", "draft", "forward", "logits"))

    target_decoder, target_head = target.get_decoder(), target.get_output_embeddings()
    drafter = Drafter(draft, vocab_map)
    target_cache = DynamicCache()
    with clock.section("prefill"):
        hidden = target_decoder(input_ids=input_ids, past_key_values=target_cache, use_cache=True).last_hidden_state
        root = rule.choose(target_head(hidden[:, -1])[0])  # () the first new token
        drafter.prefill(input_ids[0])
    if streamer is not None:
        streamer.put(input_ids.cpu())

    outputs: list[list[int]] = [[]]
    emitted, count = root.view(1, 1), torch.ones(1, dtype=torch.long, device=device)
    while not emit(emitted, count, [0], outputs, max_new_tokens, eos, stop_strings, tokenizer, streamer, stats)[0]:
        # A round emits up to g + 1 tokens: drafts past the budget would be wasted work.
        g = min(controller.choose(), max_new_tokens - len(outputs[0]) - 1)
        with clock.section("draft"):
            drafts, q = drafter.propose(root, g, rule)  # (g,), (g, V) or None
        with clock.section("forward"):
            tokens = torch.cat([root.view(1), drafts])[None]  # (1, g+1)
            hidden = target_decoder(input_ids=tokens, past_key_values=target_cache, use_cache=True).last_hidden_state
        with clock.section("logits"):
            logits = project(target_head, hidden)[0]  # (g+1, V)
            kept, next_token = accept_drafts(logits, drafts, q, rule)
        target_cache.crop(kept - g)  # drop the rejected drafts (a negative count removes)
        drafter.keep(torch.cat([root.view(1), drafts[:kept]]))
        controller.update(g, kept, clock)
        root = next_token
        emitted = torch.cat([drafts[:kept], next_token.view(1)])[None]
        count = torch.tensor([kept + 1], device=device)
        stats.steps += 1
        stats.gammas.append(g)
        stats.accept_lengths[0].append(kept)
        for depth in range(kept):
            stats.accepted_at_depth[depth] += 1

    if streamer is not None:
        streamer.end()
    stats.new_tokens = [len(outputs[0])]
    stats.time = dict(clock.totals, total=clock.elapsed())
    stats.time["other"] = stats.time["total"] - sum(clock.totals.values())
    new = torch.tensor(outputs[0], dtype=input_ids.dtype, device=device)
    return GenerateOutput(torch.cat([input_ids, new[None]], 1), outputs, stats)


def accept_drafts(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, rule: Acceptance):
    """Target logits (g+1, V) at [root, d_1..d_g], drafts (g,), draft probs q (g, V) (None for
    greedy) -> (drafts kept, the token after them)."""
    g = drafts.shape[0]
    if rule.rule == "greedy":
        choice = logits.argmax(-1)  # (g+1,)
        kept = int((choice[:g] == drafts).long().cumprod(0).sum())
        return kept, choice[kept]
    p = rule.probs(logits)  # (g+1, V)
    if g:
        p_d = p[:g].gather(1, drafts[:, None])[:, 0]
        q_d = q.gather(1, drafts[:, None])[:, 0]
        u = torch.rand(g, generator=rule.generator, device=p.device)
        ok = u * q_d < p_d  # u < p/q without dividing by a zero q (q_d > 0: d was drawn from q)
        kept = int(ok.long().cumprod(0).sum())
    else:
        kept = 0
    if kept == g:  # every draft kept: one more token from the target's next distribution
        return kept, torch.multinomial(p[g], 1, generator=rule.generator)[0]
    residual = (p[kept] - q[kept]).clamp(min=0)
    # p == q up to rounding would make a rejection (almost) impossible; if one happens anyway, p is right.
    residual = residual if float(residual.sum()) > 0 else p[kept]
    return kept, torch.multinomial(residual, 1, generator=rule.generator)[0]


class Drafter:
    """The draft model and its KV cache.

    `length` counts the sequence's tokens before the root (the target's cache length). The
    draft's cache holds a prefix of them, then possibly drafts of the last round; `pending`
    are the ones after that prefix it has not run (they go in with its next forward).
    """

    def __init__(self, draft, vocab_map: torch.Tensor | None = None):
        self.decoder = draft.get_decoder()
        head = draft.get_output_embeddings()
        self.vocab_map = None if vocab_map is None else vocab_map.to(head.weight.device)
        # The subset's rows as one contiguous matrix, read once per token.
        self.weight = head.weight if vocab_map is None else head.weight[self.vocab_map].contiguous()
        self.bias = getattr(head, "bias", None)
        if self.bias is not None and vocab_map is not None:
            self.bias = self.bias[self.vocab_map]
        self.vocab_size = head.weight.shape[0]
        self.cache = DynamicCache()
        self.pending = torch.empty(0, dtype=torch.long, device=head.weight.device)
        self.length = 0

    def prefill(self, prompt: torch.Tensor) -> None:
        self.feed(prompt)
        self.length = prompt.shape[0]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the pending tokens, then tokens (n,) -> the last one's hidden state (H,)."""
        tokens = torch.cat([self.pending, tokens])
        self.pending = tokens[:0]
        out = self.decoder(input_ids=tokens[None], past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[0, -1]

    def propose(self, root: torch.Tensor, gamma: int, rule: Acceptance):
        """gamma draft tokens after the root -> drafts (gamma,), and their distributions over the
        full vocabulary (gamma, V) when sampling (None for greedy). The last draft is not run."""
        drafts, dists = [], []
        token = root.view(1)
        for _ in range(gamma):
            logits = torch.nn.functional.linear(self.feed(token), self.weight, self.bias)  # (V',)
            if rule.rule == "greedy":
                pick = logits.argmax()
            else:
                q = rule.probs(logits)
                pick = torch.multinomial(q, 1, generator=rule.generator)[0]
                if self.vocab_map is not None:
                    q = q.new_zeros(self.vocab_size).index_copy_(0, self.vocab_map, q)
                dists.append(q)
            token = (pick if self.vocab_map is None else self.vocab_map[pick]).view(1)
            drafts.append(token)
        drafts = torch.cat(drafts) if drafts else root.new_empty(0)
        return drafts, (torch.stack(dists) if dists else None)

    def keep(self, tokens: torch.Tensor) -> None:
        """The round's emitted tokens before the next root (root first): drop cached drafts
        that were not kept, queue kept tokens the draft has not run."""
        unrun_from = self.length - len(self.pending)  # unrun = sequence[unrun_from : new length]
        unrun = torch.cat([self.pending, tokens])
        self.length += len(tokens)
        valid = min(self.cache.get_seq_length(), self.length)
        self.cache.crop(valid - self.cache.get_seq_length())
        self.pending = unrun[valid - unrun_from:]


class GammaController:
    """Chooses the drafts per round. A fixed int is used as is; "auto" maximises the expected
    tokens per second,

        E[tokens](g) / (g * t_draft + t_verify(g)),   E[tokens](g) = (1 - a^(g+1)) / (1 - a),

    with a the draft's per-token acceptance (kept over kept + rejections, recent rounds weighing
    more), t_draft its time per token and t_verify(g) the target's time for g + 1 tokens, all
    measured during this decode. A size not measured yet is assumed to cost what the nearest
    measured one did, so larger sizes get tried; after a run of g = 0 rounds one g = 1 round
    checks whether the draft has become worth it.
    """

    def __init__(self, gamma: int | str, max_gamma: int = MAX_GAMMA, memory: float = 0.9, probe_every: int = 16):
        if gamma != "auto" and not (isinstance(gamma, int) and 0 <= gamma <= 64):
            raise ValueError(f"gamma must be 'auto' or an int in [0, 64], got {gamma!r}")
        self.fixed = None if gamma == "auto" else gamma
        self.max_gamma = self.fixed if self.fixed is not None else max_gamma
        self.memory, self.probe_every = memory, probe_every
        self.kept, self.rejected = 1.0, 1.0  # a uniform prior on the acceptance rate
        self.t_draft: float | None = None
        self.t_verify: dict[int, float] = {}
        self.since_draft = 0
        self._last = {"draft": 0.0, "forward": 0.0, "logits": 0.0}

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.t_verify:
            return min(4, self.max_gamma)
        if self.since_draft >= self.probe_every:
            return 1
        return max(range(self.max_gamma + 1), key=self.expected_rate)

    def expected_rate(self, g: int) -> float:
        tokens = expected_tokens(self.acceptance, g)
        measured = min(self.t_verify, key=lambda m: (abs(m - g), m))
        t_draft = self.t_draft if self.t_draft is not None else 0.0
        return tokens / (g * t_draft + self.t_verify[measured] + 1e-9)

    def update(self, g: int, kept: int, clock: Clock) -> None:
        spent = {k: clock.totals[k] - self._last[k] for k in self._last}
        self._last = {k: clock.totals[k] for k in self._last}
        verify = spent["forward"] + spent["logits"]
        self.t_verify[g] = verify if g not in self.t_verify else 0.7 * self.t_verify[g] + 0.3 * verify
        self.since_draft = self.since_draft + 1 if g == 0 else 0
        if g == 0:
            return
        # The draft's time per token: its last round ran g tokens (plus any pending ones; close enough).
        per_token = spent["draft"] / g
        self.t_draft = per_token if self.t_draft is None else 0.7 * self.t_draft + 0.3 * per_token
        self.kept = self.memory * self.kept + kept
        self.rejected = self.memory * self.rejected + (kept < g)


def check_vocabularies(target, draft, vocab_map: torch.Tensor | None) -> None:
    """A draft must speak the target's token ids: same vocabulary size, and a map inside it."""
    v_target = target.get_output_embeddings().weight.shape[0]
    v_draft = draft.get_output_embeddings().weight.shape[0]
    if v_target != v_draft:
        raise ValueError(f"the draft's vocabulary has {v_draft} tokens and the target's {v_target}: a draft "
                         "must share the target's tokenizer")
    if vocab_map is not None and (vocab_map.ndim != 1 or int(vocab_map.max()) >= v_target or int(vocab_map.min()) < 0):
        raise ValueError(f"vocab_map must be 1-D full-vocabulary ids in [0, {v_target})")


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Tokens per round for a per-token acceptance rate (the geometric model)."""
    if acceptance >= 1:
        return gamma + 1.0
    return (1 - acceptance ** (gamma + 1)) / (1 - acceptance)


