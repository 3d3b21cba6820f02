"""Structured schema of `conf/export.yaml`, so a mistyped key or a wrong type fails at composition.

`format` is a config group whose options (native, vllm, fasterdecoding, all) live in the
ConfigStore, so `format=vllm` picks one and `format.pt=true` sets a field of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FORMAT_OPTIONS = ("native", "vllm", "fasterdecoding", "all")


@dataclass
class FormatConfig:
    name: str = MISSING  # set by the chosen option: native | vllm | fasterdecoding | all
    # fasterdecoding: also write medusa_lm_head.pt (a pickle) for FasterDecoding's own loader.
    pt: bool = False
    # fasterdecoding: give shared heads with a truncated vocabulary the full base lm_head (not identical).
    untruncate: bool = False


@dataclass
class HubConfig:
    push: bool = False
    repo_id: Optional[str] = None  # user/name or org/name
    private: bool = False
    dry_run: bool = False  # list the files and sizes a push would upload; no network
    commit_message: Optional[str] = None


@dataclass
class ExportConfig:
    run_dir: str = MISSING  # a training run folder (with heads/) or a heads folder in any format
    format: FormatConfig = field(default_factory=FormatConfig)
    output_dir: Optional[str] = None  # None: <run>/export/<format>
    overwrite: bool = False
    # Base model to load when shared heads need its lm_head (None: the heads' own base_model).
    base_model: Optional[str] = None
    # Hub id recorded in configs and model cards (None: derived from the heads' base_model).
    base_model_id: Optional[str] = None
    dtype: Optional[str] = None  # float32 | float16 | bfloat16; None keeps the heads' dtype
    allow_pickle: bool = False  # read .pt/.bin heads (torch.load(weights_only=True))
    hub: HubConfig = field(default_factory=HubConfig)


def register_export_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="export_schema", node=ExportConfig)
    for name in FORMAT_OPTIONS:
        cs.store(group="format", name=name, node=FormatConfig(name=name))
