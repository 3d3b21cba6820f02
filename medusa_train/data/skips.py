"""One warning per file for the rows we had to leave out, instead of a traceback per row.

Readers and the tokenizer mark unusable rows in three helper columns (reason, detail,
row number) while mapping, then call `drop_skipped`, which counts them, logs a single
line such as

  data/x.jsonl: skipped 3 of 120 rows: 2 empty (rows 4, 17), 1 unknown role (row 33: 'robot' in conversations[1].from)

and returns the dataset without the skipped rows or the helper columns.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import datasets

log = logging.getLogger(__name__)

SKIP, DETAIL, ROW = "_skip", "_skip_detail", "_row"  # helper columns
SKIP_FEATURES = {SKIP: datasets.Value("string"), DETAIL: datasets.Value("string"), ROW: datasets.Value("int64")}
MAX_EXAMPLES = 3


def drop_skipped(ds: datasets.Dataset, name: str, verb: str = "skipped", unit: str = "rows") -> datasets.Dataset:
    reasons = ds[SKIP]
    if any(r is not None for r in reasons):
        message = skip_message(name, reasons, ds[DETAIL], ds[ROW], verb, unit)
        log.warning(message)
        ds = ds.filter(lambda r: r is None, input_columns=SKIP, desc=f"{verb} unusable {unit}")
    return ds.remove_columns([SKIP, DETAIL, ROW])


def skip_message(name: str, reasons: list, details: list, rows: list, verb: str = "skipped",
                 unit: str = "rows") -> str:
    """Row numbers are 1-based record numbers (the line number in a JSONL file without blank lines)."""
    by_reason: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
    for reason, detail, row in zip(reasons, details, rows):
        if reason is not None:
            by_reason[reason].append((row, detail))
    parts = []
    for reason, hits in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = hits[:MAX_EXAMPLES]
        more = ", ..." if len(hits) > MAX_EXAMPLES else ""
        if all(d is None for _, d in shown):
            label = "row" if len(hits) == 1 else "rows"
            where = f"{label} {', '.join(str(r) for r, _ in shown)}{more}"
        else:
            where = "; ".join(f"row {r}: {d}" if d else f"row {r}" for r, d in shown) + more
        parts.append(f"{len(hits)} {reason} ({where})")
    skipped = sum(len(h) for h in by_reason.values())
    return f"{name}: {verb} {skipped} of {len(reasons)} {unit}: {', '.join(parts)}"
