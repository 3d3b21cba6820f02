"""vLLM Medusa format: key names and config fields as vllm-project/vllm reads them, and round trips.

Spec (vllm/model_executor/models/medusa.py, vllm/transformers_utils/configs/medusa.py):
blocks.{h}.layers.{l}.weight/.bias, lm_heads.{h}.weight (original_lm_head: one, lm_heads.0.weight),
token_map; config model_type "medusa", architectures ["MedusaModel"], num_heads, num_hidden_layers,
hidden_size, vocab_size, truncated_vocab_size, medusa_fc_bias, original_lm_head.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from medusa_train.export import load_any_heads, load_vllm, save_vllm
from medusa_train.export.formats import detect_format
from medusa_train.model import MedusaModel
from tests.unit.export.export_helpers import HIDDEN, NUM_HEADS, NUM_LAYERS, TRUNCATED, VOCAB, make_heads


def expected_keys(shared: bool, truncated: bool) -> set[str]:
    keys = {f"blocks.{h}.layers.{l}.{p}" for h in range(NUM_HEADS) for l in range(NUM_LAYERS) for p in ("weight", "bias")}
    keys |= {"lm_heads.0.weight"} if shared else {f"lm_heads.{h}.weight" for h in range(NUM_HEADS)}
    return keys | ({"token_map"} if truncated else set())


def vllm_reference_logits(folder, hidden):
    """What vLLM's Medusa computes from this folder, written from its source rather than our loader:
    ResidualBlock x + SiLU(W x [+ b if medusa_fc_bias]); lm_heads (or one lm_head from lm_heads.0.weight
    when original_lm_head); rows gathered by token_map when bigger; logits scattered to full vocab, -inf elsewhere."""
    config = json.loads((folder / "config.json").read_text())
    for key in list(config):  # MedusaConfig.from_pretrained
        if "num" in key and "heads" in key:
            config["num_heads"] = config.pop(key)
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = config.pop(key)
    w = {k.replace("medusa_heads.", ""): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    token_map = w.get("token_map") if config["truncated_vocab_size"] < config["vocab_size"] else None
    out = []
    for h in range(config["num_heads"]):
        x = hidden
        for l in range(config["num_hidden_layers"]):
            bias = w[f"blocks.{h}.layers.{l}.bias"] if config.get("medusa_fc_bias", False) else None
            x = x + F.silu(F.linear(x, w[f"blocks.{h}.layers.{l}.weight"], bias))
        lm = w["lm_heads.0.weight"] if config.get("original_lm_head", False) else w[f"lm_heads.{h}.weight"]
        if token_map is not None and lm.shape[0] > token_map.shape[0]:
            lm = lm[token_map]
        logits = F.linear(x, lm)
        if token_map is not None:
            full = torch.full((*logits.shape[:-1], config["vocab_size"]), -torch.inf)
            full[..., token_map] = logits
            logits = full
        out.append(logits)
    return torch.stack(out)  # (K, B, T, V)


def to_full_vocab(heads, logits):
    if not heads.truncated:
        return logits
    full = torch.full((*logits.shape[:-1], heads.config.vocab_size), -torch.inf)
    full[..., heads.vocab_map] = logits
    return full


@pytest.mark.parametrize("lm_head", ["shared", "own"])
@pytest.mark.parametrize("truncated", [False, True])
def test_vllm_export_matches_spec_and_round_trips(tmp_path, base, hidden, lm_head, truncated):
    heads = make_heads(base, lm_head, truncated)
    base_lm_head = base.get_output_embeddings()
    save_vllm(heads, tmp_path, base_lm_head)
    V = TRUNCATED if truncated else VOCAB

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert (config["num_heads"], config["num_hidden_layers"]) == (NUM_HEADS, NUM_LAYERS)
    assert (config["hidden_size"], config["vocab_size"], config["truncated_vocab_size"]) == (HIDDEN, VOCAB, V)
    assert config["medusa_fc_bias"] is True  # else vLLM silently drops the block biases
    assert config["original_lm_head"] is (lm_head == "shared")
    # vLLM's MedusaConfig.from_pretrained renames any key with "num" + "heads"/"layers": no strays.
    assert {k for k in config if "num" in k} == {"num_heads", "num_hidden_layers"}

    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == expected_keys(lm_head == "shared", truncated)
    assert tensors["blocks.0.layers.1.weight"].shape == (HIDDEN, HIDDEN)
    assert tensors["lm_heads.0.weight"].shape == (V, HIDDEN)
    if truncated:
        assert tensors["token_map"].dtype == torch.int64
        assert torch.equal(tensors["token_map"], heads.vocab_map)
    if lm_head == "shared":
        expected = base_lm_head.weight[heads.vocab_map] if truncated else base_lm_head.weight
        assert torch.equal(tensors["lm_heads.0.weight"], expected)

    with torch.no_grad():
        ours = heads(hidden, base_lm_head)  # (K, B, T, V')
        assert_close(vllm_reference_logits(tmp_path, hidden), to_full_vocab(heads, ours))
        back = load_vllm(tmp_path)
        assert back.config.lm_head == "own" and back.config.base_model == "tiny"
        assert back.config.truncated_vocab_size == (TRUNCATED if truncated else None)
        assert_close(back(hidden), ours)
    for name, value in heads.state_dict().items():  # weights come back bit for bit
        assert torch.equal(back.state_dict()[name], value)


def test_full_size_truncation_is_written_in_vocabulary_order(tmp_path, base, hidden):
    # vLLM ignores token_map when truncated_vocab_size == vocab_size: a permutation must be undone.
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
    heads = make_heads(base, "own", truncated=True, vocab_map=perm)
    save_vllm(heads, tmp_path)
    assert "token_map" not in load_file(str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert_close(load_vllm(tmp_path)(hidden)[..., perm], heads(hidden))


def test_vllm_loader_rules_mirrored(tmp_path, base, hidden):
    """medusa_heads. prefix, medusa_num_heads renaming, full-size lm_head gathered by token_map,
    and no medusa_fc_bias (biases dropped) behave as in vLLM."""
    heads = make_heads(base, "own", truncated=True)
    save_vllm(heads, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    full = base.get_output_embeddings().weight.detach().clone()
    full[heads.vocab_map] = tensors["lm_heads.1.weight"]
    tensors["lm_heads.1.weight"] = full  # (V, H): vLLM gathers rows token_map
    save_file({f"medusa_heads.{k}": v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config["medusa_num_heads"] = config.pop("num_heads")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert_close(load_vllm(tmp_path)(hidden), heads(hidden))

    config["medusa_fc_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = load_vllm(tmp_path)
    assert all(torch.count_nonzero(b[l].linear.bias) == 0 for b in back.blocks for l in range(NUM_LAYERS))
    with torch.no_grad():
        assert_close(vllm_reference_logits(tmp_path, hidden)[..., heads.vocab_map], back(hidden), rtol=1e-5, atol=1e-5)


def test_shared_heads_need_the_base_lm_head(tmp_path, base):
    with pytest.raises(ValueError, match="base_lm_head"):
        save_vllm(make_heads(base, "shared"), tmp_path)


def test_medusa_model_loads_a_vllm_folder(tmp_path, base):
    heads = make_heads(base, "shared")
    save_vllm(heads, tmp_path, base.get_output_embeddings())
    assert detect_format(tmp_path) == "vllm"
    model = MedusaModel.from_pretrained(base, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        assert_close(out.head_logits, heads(out.hidden_states, base.get_output_embeddings()))
    assert load_any_heads(tmp_path, base_model="other/base").config.base_model == "other/base"
