"""Tell the three heads formats apart, and load any of them as MedusaHeads."""

from __future__ import annotations

from pathlib import Path

from medusa_train.export import fasterdecoding, vllm
from medusa_train.heads import CONFIG_NAME, MedusaHeads

FORMATS = ("native", "vllm", "fasterdecoding")


def detect_format(path: str | Path) -> str:
    """'native', 'vllm' or 'fasterdecoding' for a heads folder; FileNotFoundError otherwise."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return "native"
    if fasterdecoding.is_fasterdecoding_folder(path):
        return "fasterdecoding"
    if vllm.is_vllm_folder(path):
        return "vllm"
    raise FileNotFoundError(
        f"no Medusa heads in {path}: expected {CONFIG_NAME} (medusa_train), "
        f"{fasterdecoding.WEIGHTS_NAME} or {fasterdecoding.PICKLE_WEIGHTS_NAME} (FasterDecoding), or a "
        f"config.json with model_type \"medusa\" (vLLM)"
    )


def load_any_heads(path: str | Path, allow_pickle: bool = False, base_model: str | None = None) -> MedusaHeads:
    """Heads from a native, vLLM or FasterDecoding folder.

    Pickle weight files (.pt, .bin) are refused unless allow_pickle, and are then read with
    torch.load(weights_only=True). Foreign formats load with lm_head="own". `base_model`, when
    given, replaces the base model name the folder records (vLLM folders may record none).
    """
    fmt = detect_format(path)
    if fmt == "native":
        heads = MedusaHeads.from_pretrained(path)
        if base_model:
            heads.config.base_model = base_model
        return heads
    if fmt == "vllm":
        return vllm.load_vllm(path, allow_pickle=allow_pickle, base_model=base_model)
    return fasterdecoding.load_fasterdecoding(path, allow_pickle=allow_pickle, base_model=base_model)
