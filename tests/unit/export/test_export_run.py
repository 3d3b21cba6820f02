"""export_run on run folders (everything optional but heads/), native copies and model cards."""

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

from medusa_train.export import export_run, find_run, load_any_heads, save_fasterdecoding
from medusa_train.export.model_card import hub_base_model
from medusa_train.heads import MedusaHeads
from medusa_train.model import MedusaModel
from tests.unit.export.export_helpers import NUM_HEADS, make_heads, make_run


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_all_from_a_full_run(tmp_path, base, base_dir, hidden):
    run = tmp_path / "run"
    heads = make_run(run, base, base_dir, lm_head="shared")
    written = export_run(run, "all", repo_id="me/tiny-medusa", base_model_id="me/tiny-base")
    assert set(written) == {"native", "vllm", "fasterdecoding"}
    assert all(path == run / "export" / fmt for fmt, path in written.items())

    native = written["native"]
    for name in ("medusa_heads.json", "medusa_heads.safetensors"):  # a copy of save_pretrained's folder
        assert (native / name).read_bytes() == (run / "heads" / name).read_bytes()
    for folder in written.values():
        assert (folder / "eval" / "results.json").is_file() and (folder / "eval" / "speedup.png").is_file()
        assert (folder / "train_summary.json").is_file()
        with torch.no_grad():  # every format reads back to the same head logits
            back = load_any_heads(folder)
            lm_head = base.get_output_embeddings() if back.lm_heads is None else None  # native stays shared
            assert_close(back(hidden, lm_head), heads(hidden, base.get_output_embeddings()))

    card = (native / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "medusa_train" and meta["base_model"] == "me/tiny-base"
    assert {"medusa", "speculative-decoding"} <= set(meta["tags"])
    assert 'MedusaModel.from_pretrained("me/tiny-base", "me/tiny-medusa")' in card  # the load snippet
    assert "Recipe: `medusa1`" in card and "data/default_train.jsonl" in card
    assert "1h 02m 03s" in card  # time_s from train_summary.json
    assert "| 0 | t+2 | 0.61 | 0.8 |" in card  # per-head accuracy, eval_final top1/top5
    assert "[[0], [1], [0, 0], [0, 0, 0]]" in card  # the tree
    assert "| accept_len | 1.84 |" in card and "![speedup](eval/speedup.png)" in card
    assert "lr_scheduler: cosine" in card  # the full .hydra/config.yaml
    assert str(run / "heads") not in card  # no paths of the training machine from the summary

    vllm_card = (written["vllm"] / "README.md").read_text()
    assert "vllm" in front_matter(vllm_card)["tags"]
    assert f'"method": "medusa", "model": "me/tiny-medusa", "num_speculative_tokens": {NUM_HEADS}' in vllm_card
    fd_card = (written["fasterdecoding"] / "README.md").read_text()
    assert f"--num_medusa_heads {NUM_HEADS}" in fd_card and "tensorrt-llm" in front_matter(fd_card)["tags"]


def test_bare_heads_folder_without_run_files(tmp_path, base, base_dir):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="own", extras=False)
    info = find_run(run / "heads")
    assert info.run_dir is None and info.train_summary is None and info.heads_format == "native"
    written = export_run(run / "heads", "vllm", output_dir=tmp_path / "out")
    assert written == {"vllm": tmp_path / "out"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Training" not in card and "## Evaluation" not in card
    assert "base_model" not in front_matter(card)  # a local path is no Hub id


def test_format_all_skips_what_fasterdecoding_cannot_hold(tmp_path, base, base_dir, caplog):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="shared", truncated=True, extras=False)
    with caplog.at_level(logging.WARNING):
        written = export_run(run, "all")
    assert set(written) == {"native", "vllm"} and "skipping fasterdecoding" in caplog.text
    with pytest.raises(ValueError, match="untruncate"):
        export_run(run, "fasterdecoding", output_dir=tmp_path / "fd")
    assert not (tmp_path / "fd").exists()


def test_output_guards(tmp_path, base, base_dir):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="own", extras=False)
    export_run(run, "native")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_run(run, "native")
    export_run(run, "native", overwrite=True)
    for bad in (run, run / "heads", run / "heads" / "x"):
        with pytest.raises(ValueError, match="choose another"):
            export_run(run, "native", output_dir=bad, overwrite=True)
    assert (run / "heads" / "medusa_heads.json").is_file()
    with pytest.raises(FileNotFoundError, match="no heads"):
        export_run(tmp_path / "run" / "export", "native")
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(run, "onnx")


def test_shared_heads_without_base_name(tmp_path, base):
    heads = make_heads(base, "shared", base_name=None)
    heads.save_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match="base_model="):
        export_run(tmp_path / "heads", "vllm", output_dir=tmp_path / "out")
    export_run(tmp_path / "heads", "vllm", output_dir=tmp_path / "out", base_lm_head=base.get_output_embeddings())


def test_convert_a_foreign_folder_to_native(tmp_path, base, hidden):
    heads = make_heads(base, "own")
    save_fasterdecoding(heads, tmp_path / "fd")
    written = export_run(tmp_path / "fd", "native", output_dir=tmp_path / "native", dtype=torch.bfloat16)
    stored = load_file(str(written["native"] / "medusa_heads.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    back = MedusaHeads.from_pretrained(written["native"])
    with torch.no_grad():
        assert_close(back.float()(hidden), heads(hidden), rtol=0.05, atol=0.05)


def test_hub_base_model_ids():
    assert hub_base_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_base_model("/tmp") is None and hub_base_model("tiny") is None and hub_base_model(None) is None


def test_card_never_publishes_credentials(tmp_path, base, base_dir):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="own")
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "logger:\n  api_key: sk-SECRET1\nhub_token: hf_SECRET2\nmax_new_tokens: 7\n")
    summary = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").write_text(json.dumps({**summary, "wandb_api_key": "SECRET3"}))
    card = (export_run(run, "native")["native"] / "README.md").read_text()
    assert "SECRET" not in card and "api_key: <redacted>" in card and "max_new_tokens: 7" in card


def test_medusa_model_still_loads_native_heads(tmp_path, base, base_dir, hidden):
    """model.py now goes through load_any_heads: the native path and base=None are unchanged."""
    run = tmp_path / "run"
    heads = make_run(run, base, base_dir, lm_head="shared", truncated=True, extras=False)
    model = MedusaModel.from_pretrained(None, run / "heads")  # base from the heads' base_model (a local path)
    assert model.heads.config.base_model == str(base_dir) and model.heads.lm_heads is None
    assert torch.equal(model.heads.vocab_map, heads.vocab_map)
    with torch.no_grad():
        assert_close(model.heads(hidden, model.lm_head), heads(hidden, base.get_output_embeddings()))
