"""Local JSON/JSONL files and Hugging Face hub datasets -> one `messages` column.

`load_conversations` reads each source, detects its format from its columns (see
formats.py), normalises every row to `messages: [{role, content}]` plus a `source`
column, warns once per file about unusable rows, and concatenates the sources.

A source is a local path (relative paths are tried against the working directory, then
the repo root, so `data/...` works from anywhere in a checkout) or, if no such file
exists and it does not look like a file name, a hub dataset id (`owner/name`, or
`owner/name:config`) read with `load_dataset(id, split=split)`.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import datasets

from medusa_train.data.formats import FORMATS, DataError, Skip, check_columns, detect_format, normalize_row
from medusa_train.data.skips import DETAIL, ROW, SKIP, SKIP_FEATURES, drop_skipped

MESSAGES_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "source": datasets.Value("string"),
})
_LOCAL_SUFFIXES = (".json", ".jsonl")
_JSON_LOADER_LOGGER = "datasets.packaged_modules.json.json"


def repo_root() -> Path | None:
    """The checkout holding this package (the folder with pyproject.toml), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def resolve_data_path(path: str | Path) -> Path:
    """An existing file: as given if absolute, else under the cwd, else under the repo root."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([repo_root() / p] if repo_root() else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"data file {str(path)!r} not found (looked for {', '.join(map(str, candidates))})")


def load_conversations(
    sources: list[str] | str,
    format: str = "auto",
    split: str = "train",
    max_rows: int | None = None,
    require_assistant: bool = True,
) -> datasets.Dataset:
    """Read sources into a Dataset with columns `messages` and `source`.

    format: "auto" detects each source from its columns; any of FORMATS forces one.
    split: the split of hub datasets (local files have just one).
    max_rows: read at most this many rows from each source.
    require_assistant: skip rows without an assistant turn (training); False keeps
      prompt-only rows as user-only conversations (self-distillation).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}: use auto or one of {', '.join(FORMATS)}")
    parts = [_load_source(str(s), format, split, max_rows, require_assistant) for s in sources]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        hint = " (prompt-only data has no assistant turns to train on)" if require_assistant else ""
        raise DataError(f"no usable conversations in {', '.join(map(str, sources))}{hint}")
    return ds


def _load_source(spec: str, fmt: str, split: str, max_rows: int | None, require_assistant: bool) -> datasets.Dataset:
    try:
        path = resolve_data_path(spec)
    except FileNotFoundError:
        if _looks_like_file(spec):
            raise
        raw = _load_hub(spec, split, max_rows)
    else:
        if path.is_dir():
            raise DataError(f"{spec}: is a folder; list its .json/.jsonl files as sources instead")
        raw = _read_json(path, spec, max_rows)
    if isinstance(raw, datasets.Dataset):
        columns = raw.column_names
    else:  # rows json parsed for us: a bare string is a prompt (see formats.normalize_row)
        columns = {k for row in raw if isinstance(row, dict) for k in row}
        columns |= {"prompt"} if any(isinstance(row, str) for row in raw) else set()
    if not len(raw):
        raise DataError(f"{spec}: has no rows")
    fmt = detect_format(columns, spec) if fmt == "auto" else fmt
    check_columns(fmt, columns, spec)
    kwargs = dict(fmt=fmt, source=spec, require_assistant=require_assistant)
    features = datasets.Features({**MESSAGES_FEATURES, **SKIP_FEATURES})
    if isinstance(raw, datasets.Dataset):
        ds = raw.map(_normalize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                     features=features, fn_kwargs=kwargs, desc=f"reading {spec}")
    else:
        ds = datasets.Dataset.from_dict(_normalize(raw, range(len(raw)), **kwargs), features=features)
    return drop_skipped(ds, spec)


def _looks_like_file(spec: str) -> bool:
    """Hub ids are `owner/name`: anything with a file suffix or a path shape is a missing file."""
    return spec.endswith(_LOCAL_SUFFIXES) or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def _load_hub(spec: str, split: str, max_rows: int | None) -> datasets.Dataset:
    name, _, config = spec.partition(":")
    split_expr = f"{split}[:{max_rows}]" if max_rows else split
    try:
        return datasets.load_dataset(name, config or None, split=split_expr)
    except Exception as e:  # network, auth, unknown id, bad split: add what we tried, keep the cause
        raise DataError(
            f"{spec!r}: no such local file (relative paths are tried in the cwd and the repo root), and loading it "
            f"as a Hugging Face dataset id with split {split_expr!r} failed: {type(e).__name__}: {e}"
        ) from e


def _read_json(path: Path, name: str, max_rows: int | None) -> datasets.Dataset | list:
    """A Dataset via the datasets JSON loader (cached, fast), or parsed rows when pyarrow
    cannot represent the file (bare strings per line, mixed types) or it is invalid, in
    which case json tells us the line for the error message."""
    try:
        with _quiet(_JSON_LOADER_LOGGER):  # its "Failed to load JSON" error is not the user's error
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:  # DatasetGenerationError, StopIteration on an empty file, ...: our parser says why
        rows = _parse_json(path, name)
        return rows[:max_rows] if max_rows else rows
    return ds.select(range(min(max_rows, len(ds)))) if max_rows else ds


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse_json(path: Path, name: str) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data" after the first value: JSON lines
            raise DataError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return _parse_lines(text, name)
    return data if isinstance(data, list) else [data]


def _parse_lines(text: str, name: str) -> list:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {lineno} is not valid JSON (column {e.colno}: {e.msg})") from None
    return rows


def _normalize_batch(batch: dict, indices: list[int], **kwargs) -> dict:
    """Dataset.map adapter: columns -> row dicts -> `_normalize`."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return _normalize(rows, indices, **kwargs)


def _normalize(rows: list, indices, fmt: str, source: str, require_assistant: bool) -> dict:
    """Rows -> columns messages, source and the skip columns. A row's own string `source`
    field wins over the file name (the bundled mix records where each row came from)."""
    out = {"messages": [], "source": [], SKIP: [], DETAIL: [], ROW: []}

    def add(messages, row_source, skip: Skip | None, index: int) -> None:
        out["messages"].append(messages)
        out["source"].append(row_source)
        out[SKIP].append(skip.reason if skip else None)
        out[DETAIL].append(skip.detail if skip else None)
        out[ROW].append(index + 1)

    for row, index in zip(rows, indices):
        own = row.get("source") if isinstance(row, dict) else None
        row_source = own if isinstance(own, str) and own else source
        result = normalize_row(row, fmt, require_assistant)
        if isinstance(result, Skip):
            add([], row_source, result, index)
        else:
            for messages in result:
                add(messages, row_source, None, index)
    return out
