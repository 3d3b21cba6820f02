"""`python -m medusa_train.export`: config composition, export + push in process, and one real CLI run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from medusa_train.export.__main__ import CONF_DIR, run_export
from medusa_train.export.config import FORMAT_OPTIONS
from tests.unit.export.export_helpers import make_run

SECRET = "hf_TESTsecretTOKENdoNOTprint456"
REPO_ROOT = Path(__file__).resolve().parents[3]


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def test_config_composes_and_rejects_typos():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="export", overrides=["run_dir=runs/x"])
        assert cfg.format.name == "all" and cfg.hub.push is False and cfg.output_dir is None
        for option in FORMAT_OPTIONS:
            assert compose(config_name="export", overrides=["run_dir=x", f"format={option}"]).format.name == option
        cfg = compose(config_name="export", overrides=["run_dir=x", "format=fasterdecoding", "format.pt=true",
                                                       "hub.push=true", "hub.repo_id=me/h"])
        assert cfg.format.pt is True and cfg.hub.repo_id == "me/h"
        with pytest.raises(ConfigCompositionException):
            compose(config_name="export", overrides=["run_dir=x", "format=onnx"])
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose(config_name="export", overrides=["run_dir=x", "hub.pussh=true"])
        with pytest.raises((ConfigCompositionException, ValidationError)):
            compose(config_name="export", overrides=["run_dir=x", "hub.push=maybe"])


def test_export_and_push_in_process(tmp_path, base, base_dir, monkeypatch, capsys, caplog):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="shared")
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append((self.token, kw)))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = _compose([f"run_dir={run}", "format=vllm", f"output_dir={tmp_path / 'out'}", "hub.push=true",
                    "hub.repo_id=me/tiny-medusa-vllm", "hub.private=true"])
    written = run_export(cfg)
    assert written == {"vllm": tmp_path / "out"}
    (token, kwargs), = uploads
    assert token == SECRET and kwargs["folder_path"] == str(tmp_path / "out")
    assert kwargs["repo_id"] == "me/tiny-medusa-vllm"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "medusa"
    assert '"model": "me/tiny-medusa-vllm"' in (tmp_path / "out" / "README.md").read_text()
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert not any(SECRET in p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())


@pytest.mark.parametrize("overrides, message", [
    (["format=all", "hub.push=true", "hub.repo_id=me/x"], "one format"),
    (["format=vllm", "hub.push=true"], "hub.repo_id"),
    (["format=vllm", "format.pt=true"], "fasterdecoding only"),
    (["format=vllm", "dtype=int8"], "dtype"),
])
def test_cli_refuses_contradictions(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_export(_compose([f"run_dir={tmp_path}", *overrides]))


def test_cli_subprocess_dry_run(tmp_path, base, base_dir):
    run = tmp_path / "run"
    make_run(run, base, base_dir, lm_head="own", extras=False)  # own heads: no base model to load, a faster start
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "medusa_train.export", f"run_dir={run}", "format=fasterdecoding", "format.pt=true",
         "hub.dry_run=true", "hub.repo_id=me/tiny-medusa"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "would upload" in proc.stdout and "medusa_lm_head.pt" in proc.stdout and "Hub token: found" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra/ or log file in the working directory
    assert (run / "export" / "fasterdecoding" / "medusa_lm_head.safetensors").is_file()
