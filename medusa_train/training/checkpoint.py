"""Atomic files and resumable training checkpoints.

A checkpoint is a folder `step_{N}` written under a temporary name and renamed into
place, so a kill at any moment leaves either the previous checkpoint or the new one,
never half of one. `latest_checkpoint` only ever sees complete folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

CHECKPOINT_PREFIX = "step_"
STATE_NAME = "trainer_state.json"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint_dir(output_dir: Path, step: int, write: Callable[[Path], None], state: dict, keep: int = 2) -> Path:
    """Write a complete `step_{step}` folder atomically and keep only the newest `keep`."""
    tmp = begin_checkpoint(output_dir, step)
    write(tmp)
    return finish_checkpoint(output_dir, step, tmp, state, keep)


def checkpoint_tmp_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f".{CHECKPOINT_PREFIX}{step}.tmp"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """An empty temporary folder for checkpoint `step` (the main process makes it; under
    DeepSpeed every process then writes its shard into it: a filesystem all nodes share)."""
    tmp = checkpoint_tmp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(output_dir: Path, step: int, tmp: Path, state: dict, keep: int = 2) -> Path:
    """Add the trainer state to `tmp`, rename it to `step_{step}`, keep the newest `keep`."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    (tmp / STATE_NAME).write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_NAME).is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_NAME).read_text())
