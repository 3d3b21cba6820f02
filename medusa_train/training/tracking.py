"""Experiment tracking through accelerate's trackers (W&B), offline unless a key exists."""

from __future__ import annotations

import netrc
import os

from omegaconf import DictConfig, OmegaConf


def wandb_mode(requested: str) -> str:
    """'auto' -> online when WANDB_API_KEY or a `wandb login` entry exists, else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        hosts = {}
    return "online" if any("wandb" in h for h in hosts) else "offline"


def tracker_name(cfg: DictConfig) -> str | None:
    """What to pass as Accelerator(log_with=...)."""
    if cfg.logger.backend == "none":
        return None
    if cfg.logger.backend != "wandb":
        raise ValueError(f"logger.backend must be wandb or none, got {cfg.logger.backend!r}")
    return "wandb"


def init_tracking(accelerator, cfg: DictConfig) -> None:
    if tracker_name(cfg) is None:
        return
    accelerator.init_trackers(
        cfg.logger.project,
        config=OmegaConf.to_container(cfg, resolve=True),
        init_kwargs={"wandb": {"dir": cfg.output_dir, "mode": wandb_mode(cfg.logger.mode),
                               "name": cfg.logger.run_name or cfg.recipe.name}},
    )
