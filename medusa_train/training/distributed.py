"""What a recipe does differently when `accelerate launch` runs it under DeepSpeed ZeRO.

The plain path (one process, DDP) is unchanged: every helper here returns the plain
answer when DeepSpeed is off. Under DeepSpeed:

- the batch settings of the run fill the DeepSpeed config's "auto" values (micro-batch,
  accumulation, clipping) and contradict no explicit one (`fill_deepspeed_config`);
- the engine takes the optimizer step inside `accelerator.backward` on the last
  micro-batch of a step, divides the loss by the accumulation steps and clips gradients
  itself (`begin_micro_batch`, `loss_scale`);
- checkpoints go through `accelerator.save_state` / `load_state`, every process writing
  its shard of the optimizer state (ZeRO-1/2/3) and, under ZeRO-3, of the trainable
  weights; frozen backbone weights are not written (`save_engine_state`);
- under ZeRO-3 parameters are partitioned: the heads are gathered before they are saved
  (`gathered_state`), and every process must run the same number of forward passes, so
  uneven shards are padded with passes whose results are dropped.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedType
from torch import nn

from medusa_train.heads import MedusaHeads

ENGINE_DIR = "engine"  # in a checkpoint folder: accelerate's save_state output (sharded optimizer state)
DEEPSPEED_ON_CPU = "MEDUSA_TRAIN_DEEPSPEED_ON_CPU"  # tests only: DeepSpeed over gloo on the CPU


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    """0-3 under DeepSpeed, None otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3(accelerator) -> bool:
    return zero_stage(accelerator) == 3


def fill_deepspeed_config(accelerator, micro_batch_size: int, grad_accum_steps: int, max_grad_norm: float) -> None:
    """Put the run's batch settings into the engine's DeepSpeed config (see fill_batch_settings)."""
    if is_deepspeed(accelerator):
        fill_batch_settings(accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch_size, grad_accum_steps,
                            accelerator.num_processes, max_grad_norm)


def fill_batch_settings(config: dict, micro_batch_size: int, grad_accum_steps: int, processes: int,
                        max_grad_norm: float) -> dict:
    """Fill a DeepSpeed config's "auto" batch values from the run's train.* settings, in place;
    refuse explicit values that disagree (one source of truth: the Hydra config)."""
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * processes,
        "gradient_clipping": float(max_grad_norm),
    }
    clashes = []
    for key, value in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif float(config[key]) != float(value):
            clashes.append(f"{key}={config[key]} (the run needs {value})")
    if clashes:
        raise ValueError("the DeepSpeed config contradicts train.micro_batch_size / grad_accum_steps / max_grad_norm: "
                         f"{', '.join(clashes)}; set them to auto there, or change the train.* values")
    return config


def check_supported(accelerator, on_nan: str) -> None:
    if is_deepspeed(accelerator) and on_nan == "skip":
        raise ValueError("train.on_nan=skip cannot undo a step under DeepSpeed (the engine steps inside "
                         "backward): use train.on_nan=stop (its fp16 loss scaler skips overflowing steps itself)")


def begin_micro_batch(accelerator, index: int, accum: int) -> None:
    """Tell a DeepSpeed engine whether micro-batch `index` ends the step (it steps then)."""
    if is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(index == accum - 1)


def end_step(accelerator) -> None:
    if is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(True)


def loss_scale(accelerator, accum: int) -> int:
    """Factor on a loss already normalised by the global batch: DDP and DeepSpeed average
    gradients over processes, and DeepSpeed also divides by the accumulation steps."""
    return accelerator.num_processes * (accum if is_deepspeed(accelerator) else 1)


def no_sync(accelerator, model):
    """DDP's no_sync on all but the last micro-batch; DeepSpeed knows the boundary already."""
    return contextlib.nullcontext() if is_deepspeed(accelerator) else accelerator.no_sync(model)


def grad_norm_value(norm) -> float:
    """The gradient norm as a float (DeepSpeed may report None before its first step)."""
    return 0.0 if norm is None else float(norm)


def compute_dtype(accelerator, module: nn.Module) -> torch.dtype | None:
    """Under DeepSpeed the engine holds the trainable weights in its precision (bf16 with
    mixed_precision=bf16) and autocast is off: inputs must arrive in that dtype. None: keep."""
    if not is_deepspeed(accelerator):
        return None
    return next(p for p in module.parameters()).dtype


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (an empty local tensor)."""
    return getattr(param, "ds_shape", param.shape)


@contextlib.contextmanager
def gathered(params, accelerator=None):
    """Whole parameters for the block under ZeRO-3 (collective: every process enters); a no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of `module`'s state dict, gathered under ZeRO-3 (collective there)."""
    with gathered(module.parameters()):
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in module.state_dict().items()}


def register_shared_weight(accelerator, owner: nn.Module, weight: torch.Tensor) -> None:
    """Under ZeRO-3, have `owner`'s forward gather `weight`, a parameter it reads but does
    not own (heads projecting with the base lm_head's weight directly)."""
    if is_zero3(accelerator):
        import deepspeed

        deepspeed.zero.register_external_parameter(owner, weight)


def max_over_processes(accelerator, n: int) -> int:
    """The largest `n` over processes (collective)."""
    if accelerator.num_processes == 1:
        return n
    return int(accelerator.gather(torch.tensor([n], device=accelerator.device)).max())


def save_engine_state(accelerator, folder) -> None:
    """Every process writes its shard of the optimizer state (and, under ZeRO-3, of the
    trainable weights) into `folder` (collective). Frozen weights are left out."""
    accelerator.save_state(str(folder), exclude_frozen_parameters=True)


def load_engine_state(accelerator, folder) -> None:
    """Inverse of `save_engine_state` (collective); frozen weights keep their loaded values."""
    accelerator.load_state(str(folder), load_module_strict=False)


def save_heads(accelerator, heads: MedusaHeads, folder) -> None:
    """Write `heads` into `folder` in the one format every topology shares (fp32 safetensors +
    json), from the main process. Collective under DeepSpeed: ZeRO-3 gathers the partitions."""
    if not is_deepspeed(accelerator):
        if accelerator.is_main_process:
            heads.save_pretrained(folder)
        return
    state = gathered_state(heads)
    if accelerator.is_main_process:
        copy = MedusaHeads(heads.config)
        copy.load_state_dict(state)
        copy.vocab_map = heads.vocab_map.detach().cpu()
        copy.save_pretrained(folder)
