"""python -m medusa_train.export run_dir=PATH [format=vllm|fasterdecoding|native|all] [key=value ...]

    python -m medusa_train.export run_dir=runs/medusa1 format=vllm hub.push=true hub.repo_id=me/smollm2-medusa

Config: conf/export.yaml (schema medusa_train/export/config.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from medusa_train.export.config import register_export_configs
from medusa_train.export.hub import HubError, push_to_hub
from medusa_train.export.runs import export_run

log = logging.getLogger("medusa_train.export")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

register_export_configs()


def run_export(cfg: DictConfig) -> dict[str, Path]:
    """Export (and push) as `cfg` says; returns {format: folder}."""
    fmt, hub = cfg.format.name, cfg.hub
    if (hub.push or hub.dry_run) and not hub.repo_id:
        raise ValueError("hub.push / hub.dry_run need hub.repo_id=user/name")
    if (hub.push or hub.dry_run) and fmt == "all":
        raise ValueError("a Hub repo holds one format: push with format=native, vllm or fasterdecoding, not all")
    if (cfg.format.pt or cfg.format.untruncate) and fmt not in ("fasterdecoding", "all"):
        raise ValueError("format.pt and format.untruncate apply to format=fasterdecoding only")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or null, got {cfg.dtype!r}")

    written = export_run(
        cfg.run_dir,
        formats=fmt,
        output_dir=cfg.output_dir,
        base_model=cfg.base_model,
        base_model_id=cfg.base_model_id,
        dtype=DTYPES.get(cfg.dtype) if cfg.dtype else None,
        pt=cfg.format.pt,
        untruncate=cfg.format.untruncate,
        allow_pickle=cfg.allow_pickle,
        overwrite=cfg.overwrite,
        repo_id=hub.repo_id,
    )
    if hub.push or hub.dry_run:
        (folder,) = written.values()
        push_to_hub(folder, hub.repo_id, private=hub.private, dry_run=hub.dry_run, commit_message=hub.commit_message)
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        run_export(cfg)
    except (HubError, ValueError, FileNotFoundError, FileExistsError) as e:
        log.error("export failed: %s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
