"""The accelerator every recipe starts from."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None) -> Accelerator:
    """mixed_precision 'auto': bf16 where the GPU supports it, else off.

    Without an accelerator, processes started by `accelerate launch` join a gloo group on
    the CPU (recipes/accelerate_configs/cpu_ddp.yaml).
    """
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with, cpu=not torch.accelerator.is_available())
