"""FasterDecoding/Medusa's heads format, which TensorRT-LLM's and TGI's Medusa loaders also read.

Mirrored from the stored copies of:

FasterDecoding/Medusa `medusa/model/medusa_model.py`
  - `MedusaConfig(medusa_num_heads, medusa_num_layers, base_model_name_or_path)` in config.json.
  - Head h is `nn.Sequential(*[ResBlock(H)] * L, nn.Linear(H, V, bias=False))`, where ResBlock is
    x + SiLU(linear(x)) with a biased Linear. So the state dict keys are `{h}.{l}.linear.weight`,
    `{h}.{l}.linear.bias` and `{h}.{L}.weight`. Every head has its own (V, H) lm_head.
  - Its `from_pretrained` reads `medusa_lm_head.pt` only (torch.load, then load_state_dict(strict=False)).
  - `[ResBlock(H)] * L` is one module repeated L times. With L > 1 that loader leaves the last layer's
    weights in every position; TensorRT-LLM and TGI load each layer on its own.

NVIDIA/TensorRT-LLM `tensorrt_llm/models/medusa/weight.py` (`load_medusa_hf`)
  - Reads `medusa_lm_head.pt` when it exists, else `medusa_lm_head.safetensors`. Keys are
    `{h}.{l}.linear.weight`, `{h}.{l}.linear.bias` and `{h}.{num_medusa_layers}.weight`. The bias is
    required.

huggingface/text-generation-inference `server/text_generation_server/layers/medusa.py` (MedusaHeadV1)
  - Reads `medusa_lm_head.safetensors` with the same `{h}.{l}.linear` and `{h}.{L}` prefixes, and takes
    `medusa_num_layers` from config.json.

NVIDIA/TensorRT-LLM `examples/medusa/convert_checkpoint.py`
  - Takes `medusa_num_layers` from the heads' config.json. It takes `medusa_num_heads` from there only
    when --num_medusa_heads is None, and that flag defaults to 4, so pass it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from medusa_train.export.common import cast, lm_head_weight, load_tensors, read_json
from medusa_train.heads import MedusaHeads, MedusaHeadsConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "medusa_lm_head.safetensors"
PICKLE_WEIGHTS_NAME = "medusa_lm_head.pt"
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_PREFIXES = ("module.", "medusa_head.", "medusa_heads.")


def check_exportable(heads: MedusaHeads, untruncate: bool = False) -> None:
    """Raise ValueError, saying what to do instead, when the format cannot hold these heads."""
    c = heads.config
    if not heads.truncated or c.truncated_vocab_size == c.vocab_size:
        return
    if heads.lm_heads is not None:
        raise ValueError(
            f"these heads project onto {c.truncated_vocab_size} of {c.vocab_size} tokens with their own "
            "lm_heads. FasterDecoding/TensorRT-LLM lm_heads cover the full vocabulary and have no token "
            "map, so they cannot express that. Export format=vllm (it has token_map) or format=native."
        )
    if not untruncate:
        raise ValueError(
            f"these heads share the base lm_head but only over {c.truncated_vocab_size} of "
            f"{c.vocab_size} tokens, and FasterDecoding/TensorRT-LLM have no truncated vocabulary. "
            "Export format=vllm (exact, via token_map), or pass format.untruncate=true to give every head "
            "the full base lm_head. That is not identical: tokens the heads were never trained to rank "
            "can then be proposed, although the base model still verifies every proposal."
        )


def fasterdecoding_tensors(
    heads: MedusaHeads,
    base_lm_head: torch.Tensor | nn.Module | None = None,
    untruncate: bool = False,
) -> tuple[dict, dict]:
    """(config dict, state dict) in FasterDecoding's layout: every head carries a full (V, H) lm_head."""
    check_exportable(heads, untruncate)
    c = heads.config
    unpermute = None
    if heads.truncated and heads.vocab_map.numel() == c.vocab_size:
        unpermute = torch.argsort(heads.vocab_map.detach().cpu().long())  # a full-size "truncation" is a permutation
    tensors: dict[str, torch.Tensor] = {}
    L = c.num_layers
    if heads.lm_heads is None:
        if base_lm_head is None:
            raise ValueError(
                "these heads share the base model's lm_head, and FasterDecoding's format gives every head its "
                "own copy: pass base_lm_head= (the base model's get_output_embeddings()), or on the CLI "
                "base_model=<name or path>"
            )
        shared = lm_head_weight(base_lm_head, c.vocab_size, c.hidden_size)  # (V, H)
    for h, block in enumerate(heads.blocks):
        for l, res in enumerate(block):
            tensors[f"{h}.{l}.linear.weight"] = res.linear.weight  # (H, H)
            tensors[f"{h}.{l}.linear.bias"] = res.linear.bias  # (H,)
        if heads.lm_heads is None:
            tensors[f"{h}.{L}.weight"] = shared  # (V, H); cast() gives each head its own storage
        else:
            weight = heads.lm_heads[h].weight
            tensors[f"{h}.{L}.weight"] = weight if unpermute is None else weight[unpermute]
    config = {
        "medusa_num_heads": c.num_heads,
        "medusa_num_layers": L,
        "base_model_name_or_path": c.base_model,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
    }
    return config, tensors


def save_fasterdecoding(
    heads: MedusaHeads,
    path: str | Path,
    base_lm_head: torch.Tensor | nn.Module | None = None,
    dtype: torch.dtype | None = None,
    pt: bool = False,
    untruncate: bool = False,
) -> Path:
    """Write `config.json` and `medusa_lm_head.safetensors`, plus `medusa_lm_head.pt` when `pt`.

    The .pt copy is only for FasterDecoding's own `MedusaModel.from_pretrained`, which reads nothing
    else. TensorRT-LLM prefers the .pt when both exist; the two files hold the same tensors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, tensors = fasterdecoding_tensors(heads, base_lm_head, untruncate)
    if config["base_model_name_or_path"] is None:
        log.warning("the heads do not name their base model: config.json gets base_model_name_or_path null")
    if heads.config.num_layers > 1:
        log.warning(
            "FasterDecoding's own MedusaModel builds [ResBlock] * %d (one module repeated), so it would load "
            "only the last of the %d layers; TensorRT-LLM and TGI load every layer",
            heads.config.num_layers, heads.config.num_layers,
        )
    tensors = cast(tensors, dtype)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    if pt:
        torch.save(tensors, path / PICKLE_WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path


def is_fasterdecoding_folder(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path / PICKLE_WEIGHTS_NAME).is_file()


def load_fasterdecoding(path: str | Path, allow_pickle: bool = False, base_model: str | None = None) -> MedusaHeads:
    """FasterDecoding heads folder (config.json + medusa_lm_head.{safetensors,pt}) -> own-lm_head MedusaHeads.

    The head and layer counts come from the weights. Published configs can be wrong about them:
    FasterDecoding/medusa-vicuna-7b-v1.3 says medusa_num_heads 2 and ships 5 heads.
    """
    path = Path(path)
    config = read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
    file = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / PICKLE_WEIGHTS_NAME
    raw = load_tensors(file, allow_pickle)

    parsed: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for key, value in raw.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{file}: unexpected key {key!r} (expected {{h}}.{{l}}.linear.weight/bias, {{h}}.{{L}}.weight)")
        parsed.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = value
    num_heads = len(parsed)
    if sorted(parsed) != list(range(num_heads)):
        raise ValueError(f"{file}: head indices {sorted(parsed)} are not 0..{num_heads - 1}")
    lm_index = {h: [l for l, kind in keys if kind == "weight"] for h, keys in parsed.items()}
    if any(len(v) != 1 for v in lm_index.values()) or len({v[0] for v in lm_index.values()}) != 1:
        raise ValueError(f"{file}: every head needs exactly one lm_head key {{h}}.{{L}}.weight at the same L")
    num_layers = lm_index[0][0]
    for key, expected in (("medusa_num_heads", num_heads), ("medusa_num_layers", num_layers)):
        if key in config and config[key] != expected:
            log.warning("%s says %s=%s but %s holds %s; using the weights",
                        path / CONFIG_NAME, key, config[key], file.name, expected)

    lm0 = parsed[0][(num_layers, "weight")]
    vocab_size, hidden_size = lm0.shape
    for key, expected in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if key in config and config[key] != expected:
            raise ValueError(f"{path / CONFIG_NAME} says {key}={config[key]} but the lm_head weights have {expected}")
    heads = MedusaHeads(
        MedusaHeadsConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_heads=num_heads,
            num_layers=num_layers,
            lm_head="own",
            base_model=base_model or config.get("base_model_name_or_path"),
        )
    )
    state = {}
    for h, keys in parsed.items():
        for l in range(num_layers):
            if (l, "linear.weight") not in keys:
                raise ValueError(f"{file}: missing {h}.{l}.linear.weight")
            state[f"blocks.{h}.{l}.linear.weight"] = keys[(l, "linear.weight")]
            state[f"blocks.{h}.{l}.linear.bias"] = keys.get((l, "linear.bias"), torch.zeros(hidden_size))
        state[f"lm_heads.{h}.weight"] = keys[(num_layers, "weight")]
    heads.load_state_dict(state)
    return heads.to(lm0.dtype)
