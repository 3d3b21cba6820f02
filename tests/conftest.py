"""Shared fixtures: tiny random models built from configs, the default model's tokenizer."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(arch: str, vocab_size: int = 256):
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(vocab_size=vocab_size, **TINY)


def tiny_model(arch: str = "llama", vocab_size: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size)).eval()


@pytest.fixture(scope="session")
def smol_tokenizer():
    from medusa_train.base_model import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads that
    wait on each other make small matmuls many times slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
