"""FasterDecoding/Medusa format (also read by TensorRT-LLM's convert_checkpoint.py): keys, config, round trips.

Spec: FasterDecoding/Medusa medusa/model/medusa_model.py (MedusaConfig medusa_num_heads, medusa_num_layers,
base_model_name_or_path; head h = Sequential(*[ResBlock] * L, Linear(H, V, bias=False)) -> keys
{h}.{l}.linear.weight, {h}.{l}.linear.bias, {h}.{L}.weight); TensorRT-LLM
tensorrt_llm/models/medusa/weight.py load_medusa_hf (medusa_lm_head.pt, else medusa_lm_head.safetensors).
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from medusa_train.export import PickleRefusedError, load_any_heads, load_fasterdecoding, save_fasterdecoding
from medusa_train.export.formats import detect_format
from medusa_train.model import MedusaModel
from tests.unit.export.export_helpers import HIDDEN, NUM_HEADS, NUM_LAYERS, VOCAB, make_heads


def expected_keys(num_layers: int) -> set[str]:
    keys = {f"{h}.{l}.linear.{p}" for h in range(NUM_HEADS) for l in range(num_layers) for p in ("weight", "bias")}
    return keys | {f"{h}.{num_layers}.weight" for h in range(NUM_HEADS)}


class ResBlock(nn.Module):  # FasterDecoding's, verbatim in behaviour
    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_medusa_head(num_heads, num_layers):
    """FasterDecoding's MedusaModel.medusa_head, as it builds it (including `[ResBlock] * L`)."""
    return nn.ModuleList(
        nn.Sequential(*([ResBlock(HIDDEN)] * num_layers), nn.Linear(HIDDEN, VOCAB, bias=False))
        for _ in range(num_heads)
    )


@pytest.mark.parametrize("lm_head", ["shared", "own"])
def test_fasterdecoding_export_matches_spec_and_round_trips(tmp_path, base, hidden, lm_head):
    heads = make_heads(base, lm_head)
    base_lm_head = base.get_output_embeddings()
    save_fasterdecoding(heads, tmp_path, base_lm_head)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"medusa_num_heads": NUM_HEADS, "medusa_num_layers": NUM_LAYERS, "base_model_name_or_path": "tiny",
                      "hidden_size": HIDDEN, "vocab_size": VOCAB}
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    assert set(tensors) == expected_keys(NUM_LAYERS)
    assert not (tmp_path / "medusa_lm_head.pt").exists()  # pickles only when asked
    for h in range(NUM_HEADS):
        assert tensors[f"{h}.{NUM_LAYERS}.weight"].shape == (VOCAB, HIDDEN)
        if lm_head == "shared":  # materialised from the base lm_head, one copy per head
            assert torch.equal(tensors[f"{h}.{NUM_LAYERS}.weight"], base_lm_head.weight)

    with torch.no_grad():
        ours = heads(hidden, base_lm_head)
        # TensorRT-LLM's load_medusa_hf indexes exactly these names for every head and layer.
        for h in range(NUM_HEADS):
            x = hidden
            for l in range(NUM_LAYERS):
                w, b = tensors[f"{h}.{l}.linear.weight"], tensors[f"{h}.{l}.linear.bias"]
                x = x + nn.functional.silu(nn.functional.linear(x, w, b))
            assert_close(nn.functional.linear(x, tensors[f"{h}.{NUM_LAYERS}.weight"]), ours[h])
        back = load_fasterdecoding(tmp_path)
        assert back.config.lm_head == "own" and back.config.base_model == "tiny"
        assert (back.config.num_heads, back.config.num_layers) == (NUM_HEADS, NUM_LAYERS)
        assert_close(back(hidden), ours)


def test_fasterdecoding_model_loads_the_export_strictly(tmp_path, base, hidden):
    """One block per head: FasterDecoding's own module tree takes the file with strict=True."""
    heads = make_heads(base, "own", num_layers=1)
    save_fasterdecoding(heads, tmp_path, pt=True)
    medusa_head = fasterdecoding_medusa_head(NUM_HEADS, 1)
    state = torch.load(tmp_path / "medusa_lm_head.pt", weights_only=True)  # what its from_pretrained reads
    medusa_head.load_state_dict(state, strict=True)
    assert state.keys() == load_file(str(tmp_path / "medusa_lm_head.safetensors")).keys()
    with torch.no_grad():
        assert_close(torch.stack([head(hidden) for head in medusa_head]), heads(hidden))


def test_pickles_need_explicit_permission(tmp_path, base, hidden):
    heads = make_heads(base, "own")
    save_fasterdecoding(heads, tmp_path, pt=True)
    (tmp_path / "medusa_lm_head.safetensors").unlink()
    assert detect_format(tmp_path) == "fasterdecoding"
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        load_any_heads(tmp_path)
    with pytest.raises(PickleRefusedError):
        MedusaModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert_close(load_any_heads(tmp_path, allow_pickle=True)(hidden), heads(hidden))
        model = MedusaModel.from_pretrained(base, tmp_path, allow_pickle=True)
        assert_close(model.heads(hidden), heads(hidden))


def test_published_checkpoint_layout_imports(tmp_path, hidden, caplog):
    """Like FasterDecoding/medusa-vicuna-7b-v1.3: a .pt of medusa_head.state_dict(), a config that
    names fewer heads than the file holds, no hidden_size/vocab_size."""
    torch.manual_seed(0)
    medusa_head = fasterdecoding_medusa_head(5, 1)
    torch.save(medusa_head.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 2, "medusa_num_layers": 1,
        "transformers_version": "4.31.0"}))
    with caplog.at_level(logging.WARNING):
        heads = load_any_heads(tmp_path, allow_pickle=True)
    assert "medusa_num_heads=2" in caplog.text
    assert (heads.config.num_heads, heads.config.num_layers, heads.config.vocab_size) == (5, 1, VOCAB)
    assert heads.config.base_model == "lmsys/vicuna-7b-v1.3"
    with torch.no_grad():
        assert_close(heads(hidden), torch.stack([head(hidden) for head in medusa_head]))


def test_truncated_vocabularies(tmp_path, base, hidden):
    with pytest.raises(ValueError, match="format=vllm"):
        save_fasterdecoding(make_heads(base, "own", truncated=True), tmp_path / "own", base.get_output_embeddings())
    shared = make_heads(base, "shared", truncated=True)
    with pytest.raises(ValueError, match="format.untruncate=true"):
        save_fasterdecoding(shared, tmp_path / "shared", base.get_output_embeddings())
    save_fasterdecoding(shared, tmp_path / "shared", base.get_output_embeddings(), untruncate=True)
    back = load_fasterdecoding(tmp_path / "shared")
    with torch.no_grad():  # full-vocabulary heads whose truncated columns are the original logits
        assert_close(back(hidden)[..., shared.vocab_map], shared(hidden, base.get_output_embeddings()))


def test_dtype_cast_and_base_check(tmp_path, base):
    heads = make_heads(base, "shared")
    save_fasterdecoding(heads, tmp_path, base.get_output_embeddings(), dtype=torch.float16)
    assert {t.dtype for t in load_file(str(tmp_path / "medusa_lm_head.safetensors")).values()} == {torch.float16}
    assert load_fasterdecoding(tmp_path).blocks[0][0].linear.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="wrong base model"):
        save_fasterdecoding(heads, tmp_path / "x", torch.zeros(VOCAB + 1, HIDDEN))
