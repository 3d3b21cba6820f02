"""Find what a training run left behind, and export its heads to one or more formats.

A run folder holds `heads/` (the heads, normally native) and, when the run got that far,
`train_summary.json`, `eval/results.json` (plus plots) and Hydra's `.hydra/config.yaml`. Any of
these except the heads may be missing. A heads folder may also be given directly, in any of the
three formats, which also converts between formats.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medusa_train.export import fasterdecoding, vllm
from medusa_train.export.formats import FORMATS, detect_format, load_any_heads
from medusa_train.export.model_card import hub_base_model, render_model_card
from medusa_train.heads import CONFIG_NAME, WEIGHTS_NAME, MedusaHeads

log = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
EVAL_RESULTS = Path("eval") / "results.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")


@dataclass
class RunInfo:
    heads_dir: Path
    heads_format: str  # native | vllm | fasterdecoding
    run_dir: Path | None = None  # the training run around heads_dir, when there is one
    train_config_text: str | None = None  # .hydra/config.yaml as written
    train_config: dict | None = None
    train_summary: dict | None = None
    eval_results: dict | list | None = None
    eval_plots: list[Path] = field(default_factory=list)


def _is_run_dir(path: Path) -> bool:
    return any((path / p).exists() for p in (SUMMARY_NAME, EVAL_RESULTS, HYDRA_CONFIG))


def find_run(path: str | Path) -> RunInfo:
    """A run folder (with heads/ inside) or a heads folder in any format -> RunInfo."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run_dir {path} is not a folder")
    try:
        heads_dir, fmt = path, detect_format(path)
        run_dir = path.parent if _is_run_dir(path.parent) else None
    except FileNotFoundError:
        if not (path / "heads").is_dir():
            checkpoints = sorted(p.name for p in path.glob("step_*"))
            hint = f" (it has checkpoints {checkpoints}: is the run still training?)" if checkpoints else ""
            raise FileNotFoundError(
                f"no heads in {path}: expected {path / 'heads' / CONFIG_NAME} or a heads folder{hint}"
            ) from None
        heads_dir, fmt, run_dir = path / "heads", detect_format(path / "heads"), path
    run = RunInfo(heads_dir=heads_dir, heads_format=fmt, run_dir=run_dir)
    if run_dir is None:
        return run
    if (run_dir / HYDRA_CONFIG).is_file():
        import yaml

        run.train_config_text = (run_dir / HYDRA_CONFIG).read_text()
        try:
            run.train_config = yaml.safe_load(run.train_config_text)
        except yaml.YAMLError as e:
            log.warning("could not parse %s: %s", run_dir / HYDRA_CONFIG, e)
    for attr, rel in (("train_summary", SUMMARY_NAME), ("eval_results", EVAL_RESULTS)):
        file = run_dir / rel
        if file.is_file():
            try:
                setattr(run, attr, json.loads(file.read_text()))
            except json.JSONDecodeError as e:
                log.warning("skipping %s: not valid JSON (%s)", file, e)
    if (run_dir / "eval").is_dir():
        run.eval_plots = sorted(p for p in (run_dir / "eval").iterdir() if p.suffix.lower() in PLOT_SUFFIXES)
    return run


def load_base_lm_head(name_or_path: str) -> torch.Tensor:
    """The (V, H) output-embedding weight of a base model, loaded with medusa_train's loader."""
    from medusa_train.base_model import load_base_model

    log.info("loading base model %s for its lm_head", name_or_path)
    model = load_base_model(name_or_path, dtype="float32")
    lm_head = model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError(f"{name_or_path}'s lm_head has a bias, which no Medusa serving format can hold")
    return lm_head.weight.detach()


@contextmanager
def staged_dir(target: Path, overwrite: bool):
    """Yield an empty temporary sibling of `target` and move it into place only when the block succeeds."""
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty: pass overwrite=true or another output_dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(
    run_dir: str | Path,
    formats: str | list[str] = "all",
    output_dir: str | Path | None = None,
    base_model: str | None = None,
    base_model_id: str | None = None,
    base_lm_head: torch.Tensor | nn.Module | None = None,
    dtype: torch.dtype | None = None,
    pt: bool = False,
    untruncate: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> dict[str, Path]:
    """Write each format's folder (weights, config, README.md, eval assets); returns {format: folder}.

    One format goes to `output_dir` itself, "all" to `output_dir/<format>`. The default is
    `<run>/export/<format>`. `base_model` is what to load for the base lm_head when the heads share
    it (default: the heads' own `base_model`), and `base_model_id` is the Hub id recorded in configs
    and cards (default: derived from the heads' `base_model`).
    """
    every = formats in ("all", ["all"])
    names = list(FORMATS) if every else [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: choose from {', '.join(FORMATS)} or all")
    run = find_run(run_dir)
    heads = load_any_heads(run.heads_dir, allow_pickle=allow_pickle).eval()
    load_name = base_model or heads.config.base_model
    recorded = base_model_id or hub_base_model(heads.config.base_model or base_model) or heads.config.base_model

    if output_dir is None:
        root = (run.run_dir / "export") if run.run_dir else run.heads_dir.parent / f"{run.heads_dir.name}-export"
        targets = {f: root / f for f in names}
    else:
        root = Path(output_dir)
        targets = {f: root / f for f in names} if len(names) > 1 or every else {names[0]: root}
    # Check everything before writing anything.
    heads_dir = run.heads_dir.resolve()
    protected = [heads_dir] + ([run.run_dir.resolve()] if run.run_dir else [])
    for target in targets.values():
        t = target.resolve()
        if t.is_relative_to(heads_dir) or any(p.is_relative_to(t) for p in protected):
            raise ValueError(f"output_dir {target} would overwrite, or sit inside, the heads being exported: choose another")
        if t.exists() and any(t.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty: pass overwrite=true or another output_dir")
    for fmt in list(targets):
        if fmt == "fasterdecoding":
            try:
                fasterdecoding.check_exportable(heads, untruncate)
            except ValueError as e:
                if not every:
                    raise
                log.warning("format=all: skipping fasterdecoding: %s", e)
                del targets[fmt]

    needs_base = heads.lm_heads is None and any(f in ("vllm", "fasterdecoding") for f in targets)
    if needs_base and base_lm_head is None:
        if not load_name:
            raise ValueError(
                "these heads share the base model's lm_head, which the vLLM and FasterDecoding formats store: "
                "the heads do not name their base model, so pass base_model=<name or path>"
            )
        base_lm_head = load_base_lm_head(load_name)

    written = {}
    for fmt, target in targets.items():
        with staged_dir(target, overwrite) as tmp:
            if fmt == "native":
                _write_native(heads, run, tmp, dtype)
            elif fmt == "vllm":
                _with_base(heads, recorded, lambda: vllm.save_vllm(heads, tmp, base_lm_head, dtype))
            else:
                _with_base(heads, recorded, lambda: fasterdecoding.save_fasterdecoding(
                    heads, tmp, base_lm_head, dtype, pt=pt, untruncate=untruncate))
            _copy_run_assets(run, tmp)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            card = render_model_card(heads.config, fmt, run=run, repo_id=repo_id, base_model_id=recorded,
                                     local_path=target, files=files + ["README.md"], untruncated=untruncate)
            (tmp / "README.md").write_text(card)
        log.info("wrote %s heads to %s", fmt, target)
        written[fmt] = target
    return written


def _with_base(heads: MedusaHeads, recorded: str | None, write) -> None:
    """Record the Hub id of the base model (not a local path or embedded name) while writing a foreign format."""
    original = heads.config.base_model
    heads.config.base_model = recorded or original
    try:
        write()
    finally:
        heads.config.base_model = original


def _write_native(heads: MedusaHeads, run: RunInfo, tmp: Path, dtype: torch.dtype | None) -> None:
    if run.heads_format == "native" and dtype is None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):  # byte-for-byte copy of save_pretrained's output
            shutil.copy2(run.heads_dir / name, tmp / name)
    else:
        (copy.deepcopy(heads).to(dtype) if dtype is not None else heads).save_pretrained(tmp)


def _copy_run_assets(run: RunInfo, tmp: Path) -> None:
    if run.run_dir is None:
        return
    if (run.run_dir / SUMMARY_NAME).is_file():
        shutil.copy2(run.run_dir / SUMMARY_NAME, tmp / SUMMARY_NAME)
    assets = ([run.run_dir / EVAL_RESULTS] if (run.run_dir / EVAL_RESULTS).is_file() else []) + run.eval_plots
    for file in assets:
        (tmp / "eval").mkdir(exist_ok=True)
        shutil.copy2(file, tmp / "eval" / file.name)
