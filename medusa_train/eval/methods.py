"""Decoding methods the benchmark can time, by name: a registry to add new ones to.

A method is built once from a `MethodContext` and then called with one prompt (1, P); it
returns a `Generation`: the new tokens (EOS included when reached), wall seconds, and the
number of base-model forwards that produced them (the prefill included), so
tau = tokens / forwards is comparable between methods.

    hf_generate   transformers `generate(do_sample=False)`: the baseline every speedup is against
    runtime_ar    our runtime with the 1-node tree: plain decoding through the Medusa code path
                  (its gap to hf_generate is implementation, not algorithm)
    medusa        our runtime with the Medusa tree
    hf_assisted   transformers assisted generation with the draft model (`draft=PATH`); arg
                  `N`, `SCHEDULE`, `N-SCHEDULE` and/or `-cT`: num_assistant_tokens, its schedule
                  (constant | heuristic | heuristic_transient), assistant_confidence_threshold
                  (e.g. `hf_assisted:4-constant-c0`: 4 drafts a round, no early stop); no arg:
                  transformers' defaults
    hf_prompt_lookup  transformers prompt-lookup decoding (n-grams from the prompt); arg: tokens
                  per guess (default 10)
    draft         our runtime with the draft model (runtime.speculative); arg `N` (gamma) or
                  `auto` (default), `-full` to project onto the full vocabulary even when the
                  draft has a truncated one (e.g. `draft:4-full`)

A method may take one argument after a colon: `medusa:chain4` is Medusa with the tree
runtime.TREES["chain4"] instead of the benchmarked tree, so several trees can be timed in
one interleaved run (`methods=[hf_generate,medusa,medusa:chain4,medusa:mc_sim_7b_63]`).

To add one:

    @register_method("my_method")
    def my_method(ctx: MethodContext, arg: str | None) -> Method:
        def run(input_ids): ...; return Generation(tokens, seconds, forwards)
        return run
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

BASELINE = "hf_generate"


@dataclass
class Generation:
    tokens: list[int]
    seconds: float
    forwards: int  # base-model forwards, prefill included
    stats: dict = field(default_factory=dict)  # method-specific: runtime time breakdown, acceptances


@dataclass
class MethodContext:
    base: Any  # the HF causal LM every method decodes for
    tokenizer: Any
    max_new_tokens: int
    model: Any = None  # MedusaModel (base + heads), for the Medusa methods
    tree: Any = None  # choices list, name in runtime.TREES, or None (the heads' config tree)
    draft: Any = None  # a loaded draft causal LM, for methods that need one
    draft_vocab_map: Any = None  # the draft's truncated vocabulary (full ids), if it has one


Method = Callable[[torch.Tensor], Generation]
METHODS: dict[str, Callable[[MethodContext, str | None], Method]] = {}
LABELS: dict[str, str] = {}


def register_method(name: str, label: str | None = None):
    def add(factory: Callable[[MethodContext, str | None], Method]):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = factory
        LABELS[name] = label or name
        return factory

    return add


def build_method(spec: str, ctx: MethodContext) -> Method:
    """`name` or `name:arg` -> the method, built once."""
    name, _, arg = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name](ctx, arg or None)


def label(spec: str) -> str:
    name, _, arg = spec.partition(":")
    return LABELS.get(name, name) + (f" [{arg}]" if arg else "")


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise ValueError(f"method {name} takes no argument, got {name}:{arg}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def count_forwards(module: torch.nn.Module):
    """Count calls of module.forward inside the block: `with count_forwards(m) as n: ...; n[0]`."""
    count = [0]
    handle = module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _eos(base) -> set[int]:
    eos = getattr(base.generation_config, "eos_token_id", None)
    return set([eos] if isinstance(eos, int) else (eos or []))


def _hf_method(ctx: MethodContext, **generate_kwargs) -> Method:
    base, eos = ctx.base, _eos(ctx.base)
    pad = ctx.tokenizer.pad_token_id

    @torch.no_grad()
    def run(input_ids: torch.Tensor) -> Generation:
        P = input_ids.shape[1]
        with count_forwards(base) as forwards:
            _sync(input_ids.device)
            start = time.perf_counter()
            out = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=ctx.max_new_tokens, pad_token_id=pad, **generate_kwargs)
            _sync(input_ids.device)
            seconds = time.perf_counter() - start
        new = out[0, P:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        return Generation(new[:end], seconds, forwards[0])

    return run


@register_method(BASELINE, "HF generate")
def hf_generate(ctx: MethodContext, arg: str | None) -> Method:
    _no_arg(BASELINE, arg)
    return _hf_method(ctx)


@register_method("hf_assisted", "HF assisted (draft)")
def hf_assisted(ctx: MethodContext, arg: str | None) -> Method:
    if ctx.draft is None:
        raise ValueError("method hf_assisted needs a draft model: draft=PATH")
    settings = assisted_settings(arg)
    run = _hf_method(ctx, assistant_model=ctx.draft)

    def run_with_settings(input_ids: torch.Tensor) -> Generation:
        # transformers reads these from the assistant's own generation config.
        config = ctx.draft.generation_config
        saved = {k: getattr(config, k, None) for k in settings}
        config.update(**settings)
        try:
            return run(input_ids)
        finally:
            config.update(**saved)

    return run_with_settings


def assisted_settings(arg: str | None) -> dict:
    """`4`, `heuristic`, `4-constant`, `4-constant-c0` ... -> assistant generation-config fields."""
    settings: dict = {}
    for part in (arg or "").split("-"):
        if not part:
            continue
        if part.isdigit():
            settings["num_assistant_tokens"] = int(part)
        elif part in ("constant", "heuristic", "heuristic_transient"):
            settings["num_assistant_tokens_schedule"] = part
        elif part.startswith("c") and _is_float(part[1:]):
            settings["assistant_confidence_threshold"] = float(part[1:])
        else:
            raise ValueError(f"hf_assisted:{arg}: {part!r} is not a token count, a schedule (constant, heuristic, "
                             "heuristic_transient) or a confidence threshold (c0.4)")
    return settings


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@register_method("hf_prompt_lookup", "HF prompt lookup")
def hf_prompt_lookup(ctx: MethodContext, arg: str | None) -> Method:
    if arg is not None and not arg.isdigit():
        raise ValueError(f"hf_prompt_lookup:{arg}: the argument is the tokens per guess, an integer")
    return _hf_method(ctx, prompt_lookup_num_tokens=int(arg or 10))


@register_method("draft", "draft model (runtime)")
def draft(ctx: MethodContext, arg: str | None) -> Method:
    from medusa_train.runtime.speculative import draft_generate

    if ctx.draft is None:
        raise ValueError("method draft needs a draft model: draft=PATH")
    parts = (arg or "auto").split("-")
    full_vocab = "full" in parts
    parts = [p for p in parts if p != "full"] or ["auto"]
    if len(parts) != 1 or not (parts[0] == "auto" or parts[0].isdigit()):
        raise ValueError(f"draft:{arg}: expected N (drafts per round), auto, and/or -full")
    gamma = "auto" if parts[0] == "auto" else int(parts[0])
    vocab_map = None if full_vocab else ctx.draft_vocab_map

    return _timed_runtime(
        lambda input_ids: draft_generate(ctx.base, ctx.draft, input_ids, gamma=gamma, vocab_map=vocab_map,
                                         max_new_tokens=ctx.max_new_tokens),
        extra_stats=lambda s: {"gammas": s.gammas})


def _runtime_method(ctx: MethodContext, tree) -> Method:
    from medusa_train.runtime import medusa_generate

    if ctx.model is None:
        raise ValueError("the Medusa runtime methods need heads: heads=PATH")
    return _timed_runtime(lambda input_ids: medusa_generate(ctx.model, input_ids, tree=tree,
                                                            max_new_tokens=ctx.max_new_tokens))


def _timed_runtime(generate: Callable[[torch.Tensor], Any], extra_stats=None) -> Method:
    """A runtime decode (one prompt -> GenerateOutput) as a timed method with its step statistics."""

    @torch.no_grad()
    def run(input_ids: torch.Tensor) -> Generation:
        _sync(input_ids.device)
        start = time.perf_counter()
        out = generate(input_ids)
        _sync(input_ids.device)
        seconds = time.perf_counter() - start
        s = out.stats
        stats = {"steps": s.steps, "time": s.time, "accepted_at_depth": s.accepted_at_depth,
                 "accept_lengths": s.accept_lengths[0], **(extra_stats(s) if extra_stats else {})}
        return Generation(out.new_tokens[0], seconds, sum(s.forwards), stats)

    return run


@register_method("runtime_ar", "runtime, 1-node tree")
def runtime_ar(ctx: MethodContext, arg: str | None) -> Method:
    _no_arg("runtime_ar", arg)
    return _runtime_method(ctx, "autoregressive")


@register_method("medusa", "Medusa (tree)")
def medusa(ctx: MethodContext, arg: str | None) -> Method:
    """arg: a tree name in runtime.TREES (default: the benchmarked tree)."""
    from medusa_train.runtime import resolve_tree

    tree = arg if arg is not None else ctx.tree
    run = _runtime_method(ctx, tree)  # checks there are heads
    depth = resolve_tree(tree, ctx.model.heads.config.tree).depth  # fail now, not after the baseline ran
    if depth > ctx.model.heads.num_heads:
        raise ValueError(f"tree {tree} is {depth} deep but the heads are {ctx.model.heads.num_heads}")
    return run
