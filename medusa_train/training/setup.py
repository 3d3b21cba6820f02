"""The accelerator every recipe starts from."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from medusa_train.training.distributed import DEEPSPEED_ON_CPU, deepspeed_requested


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None) -> Accelerator:
    """mixed_precision 'auto': bf16 where the GPU supports it, else off.

    Without an accelerator, processes started by `accelerate launch` join a gloo group on
    the CPU (recipes/accelerate_configs/cpu_ddp.yaml). A DeepSpeed config needs GPUs (the
    tests run DeepSpeed on the CPU over gloo through tests/recipes/deepspeed_cpu_entry.py).
    """
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    cpu = not torch.accelerator.is_available()
    if cpu and deepspeed_requested():
        if os.environ.get(DEEPSPEED_ON_CPU) != "1":
            raise RuntimeError("the accelerate config asks for DeepSpeed, but this machine has no GPU: on the CPU use "
                               "recipes/accelerate_configs/cpu_ddp.yaml")
        cpu = False  # accelerate would otherwise silently drop DeepSpeed
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with, cpu=cpu)
