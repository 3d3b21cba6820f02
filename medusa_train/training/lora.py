"""The Medusa-2 backbone: a LoRA adapter (peft), QLoRA on a 4-bit base, or every weight;
how it is saved next to the heads and loaded back for inference.

    peft_model = add_lora(base, r=32, alpha=16, dropout=0.05, target_modules=["all-linear"])
    with peft_model.disable_adapter():  # the original model, without a second copy
        ...
    save_backbone("runs/medusa2/backbone", "adapter", peft_model)
    base = load_backbone("smollm2-135m-instruct", "runs/medusa2/backbone")  # adapter merged, eval mode

The heads saved with a trained backbone name its folder in their config
(`extra["backbone"]`, relative to the heads folder), so `backbone_dir_for` finds it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from medusa_train.base_model import _from_pretrained, load_base_model

BACKBONE_KEY = "backbone"  # MedusaHeadsConfig.extra key: the backbone folder, relative to the heads folder
ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder marker
MODEL_CONFIG = "config.json"  # a transformers model folder's marker


# ---- building ------------------------------------------------------------------------------


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "medusa2.qlora=true needs bitsandbytes for the 4-bit (NF4) base weights, and a CUDA GPU: "
            "pip install bitsandbytes, or set medusa2.qlora=false to put the LoRA adapter on the "
            "full-precision backbone"
        )


def load_quantized_base(name_or_path: str, device, trust_remote_code: bool = False, revision: str | None = None,
                        compute_dtype: torch.dtype = torch.bfloat16):
    """The base causal LM with 4-bit NF4 weights (double-quantised), computing in `compute_dtype`."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, quantization_config=quantization, dtype=compute_dtype,
                             device_map={"": str(device)}, trust_remote_code=trust_remote_code, revision=revision)
    return model.eval()


def add_lora(base: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str],
             quantized: bool = False, gradient_checkpointing: bool = False):
    """Wrap `base` (modified in place) in a peft LoRA model; only the adapter is trainable.

    target_modules ["all-linear"]: every linear layer of the decoder blocks (attention and MLP
    projections), not the output lm_head. The adapter's B matrices start at zero, so the
    wrapped model starts out computing exactly what `base` did.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}
    if quantized:  # fp32 norms, input grads; the 4-bit weights stay frozen
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing)
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    targets = list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules="all-linear" if targets == ["all-linear"] else targets)
    return get_peft_model(base, config)


# ---- checkpoints: only what trains -----------------------------------------------------------


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad, by name, on the CPU (a LoRA adapter, or the whole model)."""
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`: every trainable parameter must be in `tensors`, nothing else."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = trainable - set(tensors), set(tensors) - trainable
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the trainable backbone parameters: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]} (other backbone or LoRA settings?)")
    module.load_state_dict(tensors, strict=False)


# ---- the trained backbone's folder -------------------------------------------------------------


def save_backbone(path: Path, kind: str, model: nn.Module, base_name: str | None = None, tokenizer=None,
                  dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None) -> Path:
    """Write the trained backbone into `path` (safetensors), replacing any folder there.

    adapter: the LoRA adapter only (adapter_config.json, adapter_model.safetensors);
    merged:  the base model `base_name` reloaded in `dtype` on the CPU with the adapter merged
             in (so QLoRA adapters merge into full-precision weights), a plain model folder;
    full:    the whole fine-tuned model `model`.
    Model folders get the tokenizer too, so they load anywhere as an ordinary model.
    """
    if kind not in ("adapter", "merged", "full"):
        raise ValueError(f"backbone save kind must be adapter, merged or full, got {kind!r}")
    path = Path(path)
    tmp, adapter_tmp = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.adapter.tmp")
    for p in (tmp, adapter_tmp):
        shutil.rmtree(p, ignore_errors=True)
    if kind == "merged":
        model.save_pretrained(adapter_tmp)
        load_backbone(base_name, adapter_tmp, dtype, "cpu", trust_remote_code, revision).save_pretrained(tmp)
        shutil.rmtree(adapter_tmp)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None and kind != "adapter":
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_backbone(base_name: str, backbone_dir: str | Path | None = None, dtype: str = "auto",
                  device: str | torch.device = "cpu", trust_remote_code: bool = False,
                  revision: str | None = None) -> nn.Module:
    """The backbone for inference, in eval mode: `base_name` with the LoRA adapter in
    `backbone_dir` merged in, or the model folder `backbone_dir` (merged or fully fine-tuned),
    or plain `base_name` when backbone_dir is None."""
    if backbone_dir is None:
        return load_base_model(base_name, dtype, device, trust_remote_code, revision)
    backbone_dir = Path(backbone_dir)
    if (backbone_dir / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        if base_name is None:
            raise ValueError(f"{backbone_dir} holds a LoRA adapter: name the base model it was trained on")
        base = load_base_model(base_name, dtype, device, trust_remote_code, revision)
        return PeftModel.from_pretrained(base, backbone_dir).merge_and_unload().eval()
    if (backbone_dir / MODEL_CONFIG).is_file():
        return load_base_model(str(backbone_dir), dtype, device, trust_remote_code)
    raise FileNotFoundError(f"no trained backbone in {backbone_dir}: expected a LoRA adapter ({ADAPTER_CONFIG}) "
                            f"or a model folder ({MODEL_CONFIG})")


def backbone_dir_for(heads_path: str | Path, heads_config) -> Path | None:
    """The backbone folder the heads in `heads_path` were trained with (Medusa-2), or None
    when they were trained on the unchanged base model (Medusa-1)."""
    relative = heads_config.extra.get(BACKBONE_KEY)
    if relative is None:
        return None
    path = Path(heads_path) / relative
    if not path.is_dir():
        raise FileNotFoundError(
            f"the heads in {heads_path} were trained together with the backbone saved in {path}, which is "
            "missing: copy that folder along with the heads (on the original model they would propose poorly)"
        )
    return path
