"""The run's output folder: refuse to mix two runs, or wipe one, without being asked."""

from __future__ import annotations

import shutil
from pathlib import Path

from medusa_train.training.checkpoint import list_checkpoints

# What a finished run leaves besides its checkpoints (medusa1/medusa2: heads, backbone;
# draft: draft). Caches (hidden_cache, target_cache) are not listed: their keys make them
# safe to reuse, and rebuilding them is the slow part of a rerun.
RUN_ARTEFACTS = ("heads", "backbone", "draft", "train_summary.json")


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, accelerator) -> None:
    output_dir = Path(output_dir)
    has_run = bool(list_checkpoints(output_dir)) or any((output_dir / a).exists() for a in RUN_ARTEFACTS)
    if has_run and not resume and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run: pass resume=true to continue it, overwrite=true to start "
            f"afresh there, or output_dir=<another folder>"
        )
    if has_run and overwrite and not resume and accelerator.is_main_process:
        for p in list_checkpoints(output_dir) + [output_dir / a for a in RUN_ARTEFACTS]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    accelerator.wait_for_everyone()
    output_dir.mkdir(parents=True, exist_ok=True)
