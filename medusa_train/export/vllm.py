"""vLLM's Medusa format: `config.json` + `model.safetensors`, written the way vLLM reads them.

Mirrored from vllm-project/vllm (the stored copies read while writing this):

`vllm/transformers_utils/configs/medusa.py` (MedusaConfig)
  - `model_type: "medusa"`, `architectures: ["MedusaModel"]` (the registry maps "MedusaModel" to
    `medusa.Medusa`, and `hf_config.model_type == "medusa"` selects the Medusa proposer).
  - `hidden_size`, `vocab_size`, `num_heads`, `num_hidden_layers`, `truncated_vocab_size`
    (null -> vocab_size).
  - Its `from_pretrained` renames every key that contains "num" and "heads" to `num_heads`, and "num"
    and "layers" to `num_hidden_layers`: the config must hold no other such key.

`vllm/model_executor/models/medusa.py` (Medusa)
  - `blocks.{h}.layers.{l}.weight` / `.bias`: ResidualBlock applies x = x + SiLU(W x + b) per layer,
    our ResBlock exactly. The Linear has a bias only when `medusa_fc_bias` is true (default false);
    otherwise the loader skips the file's biases without a word, so we always write true.
  - `lm_heads.{h}.weight`: one ParallelLMHead(truncated_vocab_size, hidden_size) per head. With
    `original_lm_head: true` there is one `lm_head` shared by all heads, filled from the checkpoint
    key `lm_heads.0.weight`. vLLM does not borrow the target model's lm_head, so shared heads must
    carry a copy of it.
  - `token_map` (int64 tensor) is read only when truncated_vocab_size < vocab_size. Head logits over the
    truncated vocabulary are scattered into a full-vocabulary row at positions `token_map`, with -inf
    elsewhere. An lm_head weight with more rows than `token_map` is gathered to rows `token_map`
    on load. This is our `vocab_map`, exactly.
  - A `medusa_heads.` prefix on keys is stripped on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from medusa_train.export.common import cast, dtype_name, lm_head_weight, load_tensors, read_json
from medusa_train.heads import MedusaHeads, MedusaHeadsConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"


def vllm_tensors(heads: MedusaHeads, base_lm_head: torch.Tensor | nn.Module | None = None) -> tuple[dict, dict]:
    """(config dict, state dict) in vLLM's Medusa layout."""
    c = heads.config
    tensors: dict[str, torch.Tensor] = {}
    for h, block in enumerate(heads.blocks):
        for l, res in enumerate(block):
            tensors[f"blocks.{h}.layers.{l}.weight"] = res.linear.weight  # (H, H)
            tensors[f"blocks.{h}.layers.{l}.bias"] = res.linear.bias  # (H,)

    vocab_map = heads.vocab_map.detach().cpu().long() if heads.truncated else None
    # A "truncation" to the full size is a permutation: vLLM ignores token_map then, so put the rows
    # back in vocabulary order instead.
    unpermute = None
    if vocab_map is not None and vocab_map.numel() == c.vocab_size:
        unpermute, vocab_map = torch.argsort(vocab_map), None

    if heads.lm_heads is None:
        if base_lm_head is None:
            raise ValueError(
                "these heads share the base model's lm_head, and vLLM needs a copy of it in the file "
                "(original_lm_head: true, key lm_heads.0.weight): pass base_lm_head= (the base model's "
                "get_output_embeddings()), or on the CLI base_model=<name or path>"
            )
        weight = lm_head_weight(base_lm_head, c.vocab_size, c.hidden_size)  # (V, H)
        if vocab_map is not None:
            weight = weight[vocab_map]  # (V', H): vLLM would gather these rows itself; store only them
        tensors["lm_heads.0.weight"] = weight
    else:
        for h, lm_head in enumerate(heads.lm_heads):
            weight = lm_head.weight  # (V', H)
            tensors[f"lm_heads.{h}.weight"] = weight if unpermute is None else weight[unpermute]
    if vocab_map is not None:
        tensors["token_map"] = vocab_map  # (V',) head id -> full vocabulary id

    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "truncated_vocab_size": c.vocab_size if vocab_map is None else int(vocab_map.numel()),
        "medusa_fc_bias": True,
        "original_lm_head": heads.lm_heads is None,
    }
    if c.base_model:
        # Not read by vLLM; other engines (LMDeploy) and our importer take the base from it.
        config["base_model_name_or_path"] = c.base_model
    return config, tensors


def save_vllm(
    heads: MedusaHeads,
    path: str | Path,
    base_lm_head: torch.Tensor | nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `config.json` and `model.safetensors` for `LLM(speculative_config={"method": "medusa", ...})`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, tensors = vllm_tensors(heads, base_lm_head)
    tensors = cast(tensors, dtype)
    config["torch_dtype"] = dtype_name(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path


def normalize_config(raw: dict) -> dict:
    """vLLM's MedusaConfig.from_pretrained key renaming, then its defaults."""
    config = dict(raw)
    for key in list(config):
        if "num" in key:
            if "heads" in key:
                config["num_heads"] = config.pop(key)
            elif "layers" in key:
                config["num_hidden_layers"] = config.pop(key)
    config.setdefault("num_heads", 5)
    config.setdefault("num_hidden_layers", 1)
    return config


def is_vllm_folder(path: Path) -> bool:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        return False
    try:
        config = read_json(config_file)
    except ValueError:
        return False
    return config.get("model_type") == "medusa" or "MedusaModel" in (config.get("architectures") or [])


def weights_file(path: Path) -> Path:
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no vLLM Medusa weights in {path}: expected {WEIGHTS_NAME}")


def load_vllm(path: str | Path, allow_pickle: bool = False, base_model: str | None = None) -> MedusaHeads:
    """vLLM Medusa folder -> MedusaHeads with own lm_heads, computing what vLLM would compute."""
    path = Path(path)
    config = normalize_config(read_json(path / CONFIG_NAME))
    tensors = {k.removeprefix("medusa_heads."): v for k, v in load_tensors(weights_file(path), allow_pickle).items()}
    num_heads, num_layers = int(config["num_heads"]), int(config["num_hidden_layers"])
    original_lm_head = bool(config.get("original_lm_head", False))
    first_lm = tensors.get("lm_heads.0.weight", tensors.get("lm_head.weight"))
    if first_lm is None:
        raise ValueError(f"{path}: no lm_heads.0.weight in the weights")
    hidden_size = int(config.get("hidden_size") or first_lm.shape[1])
    vocab_size = int(config.get("vocab_size") or first_lm.shape[0])
    truncated = int(config.get("truncated_vocab_size") or vocab_size)

    token_map = tensors.get("token_map") if truncated < vocab_size else None
    if truncated < vocab_size and token_map is None:
        raise ValueError(f"{path}: truncated_vocab_size {truncated} < vocab_size {vocab_size} but no token_map")

    heads = MedusaHeads(
        MedusaHeadsConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_heads=num_heads,
            num_layers=num_layers,
            lm_head="own",
            truncated_vocab_size=truncated if token_map is not None else None,
            base_model=base_model or config.get("base_model_name_or_path"),
        )
    )
    state = {}
    fc_bias = bool(config.get("medusa_fc_bias", False))
    for h in range(num_heads):
        for l in range(num_layers):
            state[f"blocks.{h}.{l}.linear.weight"] = _require(tensors, f"blocks.{h}.layers.{l}.weight", path)
            # Without medusa_fc_bias vLLM builds bias-free layers and drops any bias in the file.
            bias = tensors.get(f"blocks.{h}.layers.{l}.bias") if fc_bias else None
            state[f"blocks.{h}.{l}.linear.bias"] = bias if bias is not None else torch.zeros(hidden_size)
        weight = first_lm if original_lm_head else _require(tensors, f"lm_heads.{h}.weight", path)
        if token_map is not None and weight.shape[0] > token_map.numel():
            weight = weight[token_map.long()]  # as vLLM's load_weights does
        state[f"lm_heads.{h}.weight"] = weight
    heads.load_state_dict(state)
    if token_map is not None:
        heads.vocab_map = token_map.long()
    return heads.to(first_lm.dtype)


def _require(tensors: dict, key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: its config.json promises {key!r} but the weights do not hold it")
    return tensors[key]
