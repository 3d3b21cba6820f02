"""Build a draft model that speaks the target's tokenizer, before any distillation.

    draft = build_draft(target, cfg.draft)                  # init=layers | config | model

- `layers`: early exit. The chosen decoder layers of the target, in order, with its
  embeddings, final norm and lm_head, in a config of the same class with
  num_hidden_layers=len(layers). Per-layer config lists (layer_types for sliding-window
  attention, ...) are cut to the same layers, and every module is built fresh from that
  config, so each layer's `layer_idx` is its position in the draft and the KV cache fits.
- `config`: the target's config with `config_overrides` (num_hidden_layers,
  intermediate_size, ...). Every target tensor whose shape still matches is copied; the rest
  keep the class's random initialisation. With fewer layers, draft layer j copies target
  layer spread_layers(L, n)[j]: evenly spaced from the first layer to the last, so the draft
  starts as an early-exit model (the first and last layers matter most) rather than as the
  first n layers, whose output the final norm and lm_head have never seen.
- `model`: any HF model id or folder (a smaller sibling of the target). Its tokenizer must
  be the target's; a mismatch is refused, naming it.

The result is a plain transformers model: save_pretrained writes a folder that
`AutoModelForCausalLM.from_pretrained` loads and `generate(assistant_model=...)` uses.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

INITS = ("layers", "config", "model")


def build_draft(target: nn.Module, cfg: Any, target_tokenizer=None, *, dtype: str = "auto",
                trust_remote_code: bool = False) -> nn.Module:
    """A draft for `target` from a DraftConfig node (init, layers, config_overrides, model).

    The draft is on the target's device, in eval mode; `target_tokenizer` is needed only to
    check a separate model (init=model).
    """
    if cfg.init == "layers":
        return draft_from_layers(target, list(cfg.layers))
    if cfg.init == "config":
        return draft_from_config(target, dict(cfg.config_overrides or {}))
    if cfg.init == "model":
        if not cfg.model:
            raise ValueError("draft.init=model needs draft.model=<HF model id or local folder>")
        return draft_from_model(target, str(cfg.model), target_tokenizer, dtype=dtype,
                                trust_remote_code=trust_remote_code)
    raise ValueError(f"draft.init must be one of {', '.join(INITS)}, got {cfg.init!r}")


# ---- init=layers ------------------------------------------------------------------------------


def draft_from_layers(target: nn.Module, layers: list[int]) -> nn.Module:
    """The target's decoder layers `layers` (in that order) + its embeddings, final norm, lm_head."""
    num_layers = target.config.num_hidden_layers
    if not layers:
        raise ValueError("draft.layers is empty: name at least one target layer, e.g. [0, 15, 29]")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"draft.layers {bad} out of range: the target has {num_layers} layers (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"draft.layers {layers} repeats a layer")
    config = subset_config(target.config, layers)
    draft = _same_class(target, config)
    prefix = layer_prefix(target)
    state = target.state_dict()
    draft.load_state_dict({name: state[_source_name(name, prefix, layers)] for name in draft.state_dict()})
    return draft.to(_device(target)).eval()


def subset_config(config, layers: list[int]):
    """A copy of `config` with num_hidden_layers=len(layers) and every per-layer list cut to `layers`.

    A per-layer list is any list attribute as long as the target's layer count: layer_types
    (Qwen2, Mistral, Gemma sliding-window layers), no_rope_layers, ... Without cutting it a
    draft layer would take the attention type of the target layer at its *own* index.
    """
    config = copy.deepcopy(config)
    num_layers = config.num_hidden_layers
    for key, value in list(config.to_dict().items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return config


def layer_prefix(model: nn.Module) -> str:
    """State-dict prefix of the decoder's layer list: model.layers (Llama, Qwen2, ...), transformer.h (GPT-2)."""
    num_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name:
            return name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of "
                     f"{num_layers} modules")


def _source_name(name: str, prefix: str, layers: list[int]) -> str:
    """Draft state-dict key -> the target key it copies (layer j -> layer layers[j])."""
    head = prefix + "."
    if not name.startswith(head):
        return name
    index, rest = name[len(head):].split(".", 1)
    return f"{head}{layers[int(index)]}.{rest}"


# ---- init=config ------------------------------------------------------------------------------


def spread_layers(num_target: int, num_draft: int) -> list[int]:
    """num_draft target layers evenly spaced from the first to the last (n=1: the first)."""
    if num_draft >= num_target:
        return list(range(num_draft))  # extra draft layers beyond the target's are left random
    if num_draft == 1:
        return [0]
    return [round(j * (num_target - 1) / (num_draft - 1)) for j in range(num_draft)]


def draft_from_config(target: nn.Module, overrides: dict) -> nn.Module:
    """The target's config with `overrides`, every shape-matching target tensor copied."""
    config = copy.deepcopy(target.config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"draft.config_overrides: {type(config).__name__} has no {', '.join(unknown)}")
    num_target = target.config.num_hidden_layers
    num_draft = int(overrides.get("num_hidden_layers", num_target))
    mapping = spread_layers(num_target, num_draft)
    if num_draft != num_target:
        config = subset_config(config, [min(i, num_target - 1) for i in mapping])
    for key, value in overrides.items():
        setattr(config, key, value)
    draft = _same_class(target, config)
    prefix = layer_prefix(target) if num_draft <= num_target else None
    state = target.state_dict()
    copied, kept = [], []
    new_state = draft.state_dict()
    for name, tensor in new_state.items():
        source = _source_name(name, prefix, mapping) if prefix else name
        if source in state and state[source].shape == tensor.shape:
            new_state[name] = state[source]
            copied.append(name)
        else:
            kept.append(name)
    draft.load_state_dict(new_state)
    log.info("draft from config: %d tensors copied from the target, %d freshly initialised%s", len(copied),
             len(kept), f" ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else "")
    return draft.to(_device(target)).eval()


# ---- init=model -------------------------------------------------------------------------------


def draft_from_model(target: nn.Module, name_or_path: str, target_tokenizer=None, *, dtype: str = "auto",
                     trust_remote_code: bool = False) -> nn.Module:
    """Any causal LM, checked to share the target's tokenizer."""
    from medusa_train.base_model import load_base_model, load_tokenizer

    draft = load_base_model(name_or_path, dtype, _device(target), trust_remote_code)
    draft_tokenizer = None
    try:
        draft_tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    except (OSError, ValueError) as e:  # a weights-only folder: the vocabulary sizes are all we can compare
        log.warning("draft model %s has no loadable tokenizer (%s): checking vocabulary sizes only", name_or_path, e)
    check_compatible(target, draft, target_tokenizer, draft_tokenizer, name_or_path)
    return draft.eval()


def check_compatible(target: nn.Module, draft: nn.Module, target_tokenizer=None, draft_tokenizer=None,
                     draft_name: str = "the draft") -> None:
    """Raise ValueError naming the first difference that would make draft tokens mean
    something else to the target: tokenizer vocabulary, special tokens, or an embedding
    table too small for the tokenizer."""
    needed = len(target_tokenizer) if target_tokenizer is not None else target.get_input_embeddings().num_embeddings
    draft_rows = draft.get_input_embeddings().num_embeddings
    if draft_rows < needed:
        raise ValueError(f"draft model {draft_name} has {draft_rows} embedding rows but the target's tokenizer has "
                         f"{needed} tokens: it cannot be a draft for this target (a different tokenizer)")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    if len(draft_tokenizer) != len(target_tokenizer):
        raise ValueError(f"draft model {draft_name}'s tokenizer has {len(draft_tokenizer)} tokens, the target's "
                         f"{len(target_tokenizer)}: the draft must share the target's tokenizer")
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        token = next(t for t in sorted(target_vocab) if draft_vocab.get(t) != target_vocab[t])
        raise ValueError(f"draft model {draft_name}'s tokenizer differs from the target's: token {token!r} is id "
                         f"{target_vocab[token]} for the target and {draft_vocab.get(token)} for the draft")
    for attr in ("eos_token_id", "bos_token_id"):
        a, b = getattr(target_tokenizer, attr), getattr(draft_tokenizer, attr)
        if a != b:
            raise ValueError(f"draft model {draft_name}'s {attr} is {b}, the target's {a}")


# ---- shared -----------------------------------------------------------------------------------


def _same_class(target: nn.Module, config) -> nn.Module:
    """A fresh model of the target's class and dtype (tied embeddings follow the config)."""
    return type(target)._from_config(config, dtype=target.dtype)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def embeddings_from_target(draft: nn.Module, target: nn.Module) -> bool:
    """True when the draft's input embeddings and lm_head equal the target's (copied, not re-initialised)."""
    pairs = [(draft.get_input_embeddings(), target.get_input_embeddings()),
             (draft.get_output_embeddings(), target.get_output_embeddings())]
    return all(d is not None and t is not None and d.weight.shape == t.weight.shape
               and torch.equal(d.weight.detach().cpu(), t.weight.detach().cpu()) for d, t in pairs)
