"""Small pieces the format modules share: safe tensor-file loading and the base lm_head weight."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class PickleRefusedError(ValueError):
    """A heads file is a pickle and the caller did not allow pickles."""


def load_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file, or (only with allow_pickle) a torch pickle read with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: not a .safetensors or torch pickle ({', '.join(PICKLE_SUFFIXES)}) file")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle file, and unpickling a file from the internet can run arbitrary code. "
            "Prefer a .safetensors copy of it; to read this one anyway pass allow_pickle=True "
            "(CLI: allow_pickle=true): it is then loaded with torch.load(weights_only=True)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(state)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def lm_head_weight(base_lm_head: torch.Tensor | nn.Module, vocab_size: int, hidden_size: int) -> torch.Tensor:
    """The (V, H) weight of a base lm_head given as a module or a tensor, checked for shape and bias.

    None of the serving formats has room for an lm_head bias, so a biased base lm_head is refused.
    """
    if isinstance(base_lm_head, nn.Module):
        if getattr(base_lm_head, "bias", None) is not None:
            raise ValueError(
                "the base lm_head has a bias; vLLM's and FasterDecoding's Medusa formats have no lm_head "
                "bias, so these heads cannot be exported faithfully"
            )
        weight = base_lm_head.weight
    else:
        weight = base_lm_head
    weight = weight.detach()
    if tuple(weight.shape) != (vocab_size, hidden_size):
        raise ValueError(
            f"base lm_head weight has shape {tuple(weight.shape)} but the heads were made for "
            f"(vocab_size={vocab_size}, hidden_size={hidden_size}): wrong base model?"
        )
    return weight.cpu()


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (None: unchanged), contiguous, on CPU, no two sharing memory.

    safetensors refuses tensors that share storage, so a repeated tensor (the base lm_head copied
    into every head) is cloned for each further key.
    """
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    floating = [v.dtype for v in tensors.values() if v.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"
