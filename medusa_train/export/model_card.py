"""README.md model cards for exported heads: Hub front matter, then what was trained, how, and how well.

Everything the run left behind is optional: the card says what it knows and leaves out the rest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from medusa_train.heads import MedusaHeadsConfig

if TYPE_CHECKING:
    from medusa_train.export.runs import RunInfo

# Embedded base models (medusa_train.base_model.EMBEDDED_MODELS) are GGUF copies of these Hub models.
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
FORMAT_TAGS = {"native": [], "vllm": ["vllm"], "fasterdecoding": ["fasterdecoding", "tensorrt-llm"]}
FORMAT_NAMES = {
    "native": "medusa_train (`medusa_heads.json` + `medusa_heads.safetensors`)",
    "vllm": "vLLM Medusa (`config.json` + `model.safetensors`)",
    "fasterdecoding": "FasterDecoding/Medusa (`config.json` + `medusa_lm_head.safetensors`), also read by TensorRT-LLM and TGI",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HEAD_KEY = re.compile(r"(?:^|/)heads?[_/]?(\d+)/(.+)$")
_PER_HEAD_LEAF = re.compile(r"(top\d+|acc|head)[^/]*$", re.IGNORECASE)
# Config and summary keys that may hold credentials; never published in a card.
_SECRET_KEY = re.compile(r"(^|[_.-])(token|auth)$|secret|password|passwd|api_?key|credential", re.IGNORECASE)
_YAML_KEY_LINE = re.compile(r"^(\s*-?\s*)([\w.-]+)(\s*:\s*)(\S.*)$")
_TIME_WORDS = ("time", "runtime", "elapsed", "duration", "seconds")


def hub_base_model(name: str | None) -> str | None:
    """The Hub id of a base model name, or None for local paths and unknown names."""
    if not name:
        return None
    if name.lower() in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name.lower()]
    if _HUB_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


def render_model_card(
    config: MedusaHeadsConfig,
    fmt: str,
    run: RunInfo | None = None,
    repo_id: str | None = None,
    base_model_id: str | None = None,
    local_path: str | Path | None = None,
    files: list[str] | None = None,
    untruncated: bool = False,
) -> str:
    base_id = base_model_id if base_model_id and hub_base_model(base_model_id) else hub_base_model(config.base_model)
    base = base_id or config.base_model or "<base model>"
    ref = repo_id or (str(local_path) if local_path else "path/to/this/folder")
    front = {"library_name": "medusa_train"}
    if base_id:
        front["base_model"] = base_id
    front["tags"] = ["medusa", "speculative-decoding", "medusa_train", *FORMAT_TAGS[fmt]]
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False) + "---", f"# Medusa heads for {base}"]

    layers = f"{config.num_layers} residual block{'s' if config.num_layers != 1 else ''}"
    parts.append(
        f"{config.num_heads} Medusa heads ({layers} each) for `{base}`. Format: {FORMAT_NAMES[fmt]}. "
        "Head k (0-based) predicts the token k + 2 positions ahead; the base model's own lm_head predicts the "
        "next one. Proposals are always verified by the base model, so outputs match the base model's."
    )
    parts.append("## Usage\n\n" + _usage(fmt, base, ref, config))
    parts.append("## Heads\n\n" + _heads_table(config, fmt, untruncated))
    if run is not None and run.run_dir is not None:
        parts.extend(_training_sections(run, config.num_heads))
    parts.append("## Tree\n\n" + _tree(config.tree))
    if run is not None and (run.eval_results is not None or run.eval_plots):
        parts.append("## Evaluation\n\n" + _evaluation(run, config.num_heads))
    if files:
        parts.append("## Files\n\n" + "\n".join(f"- `{f}`" for f in sorted(files)))
    return "\n\n".join(parts) + "\n"


def _usage(fmt: str, base: str, ref: str, config: MedusaHeadsConfig) -> str:
    native = f'from medusa_train import MedusaModel\nmodel = MedusaModel.from_pretrained("{base}", "{ref}")'
    if fmt == "native":
        return f"```python\n{native}\n```"
    if fmt == "vllm":
        return (
            "With vLLM (proposals from each head's top-1 token):\n\n```python\nfrom vllm import LLM\n"
            f'llm = LLM(model="{base}", speculative_config={{"method": "medusa", "model": "{ref}", '
            f'"num_speculative_tokens": {config.num_heads}}})\n```\n\n'
            f"medusa_train reads this folder too:\n\n```python\n{native}\n```"
        )
    return (
        "TensorRT-LLM (`examples/medusa/convert_checkpoint.py` takes the layer count from config.json; pass the "
        "head count, its default is 4):\n\n```bash\n"
        f"python examples/medusa/convert_checkpoint.py --model_dir <{base} checkout> --medusa_model_dir <this folder> "
        f"--num_medusa_heads {config.num_heads} --output_dir tllm_ckpt --dtype float16\n```\n\n"
        "FasterDecoding/Medusa's own `MedusaModel.from_pretrained` reads only `medusa_lm_head.pt` "
        "(export with `format.pt=true`).\n\n"
        f"medusa_train reads this folder too:\n\n```python\n{native}\n```"
    )


def _heads_table(config: MedusaHeadsConfig, fmt: str, untruncated: bool) -> str:
    if config.lm_head == "shared":
        lm_head = "shared: the base model's lm_head" + (
            " (stored in the export: vLLM and FasterDecoding keep their own copy)" if fmt != "native" else ""
        )
    else:
        lm_head = "own: one projection per head"
    vocab = f"full ({config.vocab_size})"
    if config.truncated_vocab_size is not None:
        vocab = f"truncated to {config.truncated_vocab_size} of {config.vocab_size} tokens"
        if fmt == "vllm":
            vocab += " (`token_map`)"
        if fmt == "fasterdecoding" and untruncated:
            vocab += "; exported with the full base lm_head (`format.untruncate=true`)"
    rows = [("heads", config.num_heads), ("residual blocks per head", config.num_layers), ("lm_head", lm_head),
            ("vocabulary", vocab), ("hidden size", config.hidden_size), ("base model", f"`{config.base_model}`")]
    return _table(["setting", "value"], rows)


def _training_sections(run: RunInfo, num_heads: int) -> list[str]:
    sections = []
    cfg = run.train_config or {}
    summary = run.train_summary or {}
    flat = _flatten(summary, num_heads=num_heads)
    lines = []
    recipe = _get(cfg, "recipe", "name")
    if recipe:
        lines.append(f"- Recipe: `{recipe}`")
    if _get(cfg, "model", "name_or_path"):
        lines.append(f"- Base model trained on: `{_get(cfg, 'model', 'name_or_path')}`")
    data = _get(cfg, "data") or {}
    if data:
        sources = ", ".join(f"`{s}`" for s in data.get("sources") or [])
        extra = ", ".join(f"{k}={data[k]}" for k in ("format", "max_length", "max_rows") if data.get(k) is not None)
        lines.append(f"- Data: {sources or 'unknown'}" + (f" ({extra})" if extra else ""))
    train = _get(cfg, "train") or {}
    if train:
        batch = [train.get(k) for k in ("micro_batch_size", "grad_accum_steps")]
        lines.append(
            f"- Schedule: {train.get('max_steps')} steps, micro-batch {batch[0]} x accumulation {batch[1]}, "
            f"lr {train.get('lr')} ({train.get('lr_scheduler', 'constant')})"
        )
    times = [(k, v) for k, v in flat.items() if _is_time(k, v)]
    if times:
        lines.append("- Training time: " + ", ".join(f"{_duration(v)} (`{k}`)" for k, v in times))
    body = "\n".join(lines) if lines else "No training config or summary was saved with this run."
    scalars = _scalar_table(flat, skip=lambda k, v: _is_time(k, v) or _unpublished(k))
    if scalars:
        body += "\n\n" + scalars
    if run.train_config_text:
        body += ("\n\n<details><summary>Full training config (<code>.hydra/config.yaml</code>)</summary>\n\n"
                 f"```yaml\n{_redact(run.train_config_text).rstrip()}\n```\n\n</details>")
    sections.append("## Training\n\n" + body)
    per_head = _head_table(flat)
    if per_head:
        sections.append("## Per-head accuracy\n\nFrom `train_summary.json`; head k (0-based) is scored on the token "
                        "k + 2 ahead.\n\n" + per_head)
    return sections


def _evaluation(run: RunInfo, num_heads: int) -> str:
    parts = []
    results = run.eval_results
    if isinstance(results, list) and results and all(isinstance(r, dict) for r in results):
        parts.append(_rows_table(results))
    elif isinstance(results, dict):
        tables = {k: v for k, v in results.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        flat = _flatten({k: v for k, v in results.items() if k not in tables}, num_heads=num_heads)
        parts.extend(t for t in (_scalar_table(flat, skip=lambda k, v: _unpublished(k)), _head_table(flat)) if t)
        parts.extend(f"**{name}**\n\n{_rows_table(rows)}" for name, rows in tables.items())
    parts.extend(f"![{p.stem}](eval/{p.name})" for p in run.eval_plots)
    return "\n\n".join(parts) if parts else "No evaluation results."


def _tree(tree: list[list[int]] | None) -> str:
    if not tree:
        return "No tree was chosen for these heads; runtimes use their default."
    depth = max(len(path) for path in tree)
    return (f"{len(tree)} candidate nodes, depth {depth} (top-k index paths, Medusa `choices`):\n\n"
            f"```json\n{json.dumps(tree)}\n```")


# ---- helpers -----------------------------------------------------------------------------


def _flatten(obj, prefix: str = "", num_heads: int | None = None) -> dict:
    """Nested dicts -> {"a/b": scalar}. A list of num_heads numbers under a per-head metric name
    (top1, acc..., or a key naming heads) becomes one "a/head{k}/leaf" entry per head; other lists
    (per-step losses) are left out."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k), num_heads))
    elif isinstance(obj, list):
        parent, _, leaf = prefix.rpartition("/")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj)
        if numbers and len(obj) == num_heads and _PER_HEAD_LEAF.search(prefix):
            for k, v in enumerate(obj):
                out[(parent + "/" if parent else "") + f"head{k}/{leaf}"] = v
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out


def _scalar_table(flat: dict, skip) -> str:
    rows = [(k, _fmt(v)) for k, v in flat.items() if not _HEAD_KEY.search(k) and not skip(k, v)]
    return _table(["metric", "value"], rows) if rows else ""


def _head_table(flat: dict) -> str:
    metrics = _head_metrics(flat)
    if not metrics:
        return ""
    columns = sorted({c for m in metrics.values() for c in m})
    rows = [(k, f"t+{k + 2}", *(_fmt(metrics[k].get(c)) for c in columns)) for k in sorted(metrics)]
    return _table(["head", "predicts", *columns], rows)


def _unpublished(key: str) -> bool:
    """Folder paths of the machine that trained (no use to a reader), and anything credential-like."""
    leaf = key.rsplit("/", 1)[-1].lower()
    return leaf.endswith(("_dir", "_path")) or leaf in ("dir", "path") or bool(_SECRET_KEY.search(leaf))


def _redact(yaml_text: str) -> str:
    """Blank the values of credential-like keys (hub_token, api_key, ...) in a YAML config."""
    lines = []
    for line in yaml_text.splitlines():
        m = _YAML_KEY_LINE.match(line)
        lines.append(f"{m[1]}{m[2]}{m[3]}<redacted>" if m and _SECRET_KEY.search(m[2]) else line)
    return "\n".join(lines)


def _head_metrics(flat: dict) -> dict[int, dict[str, object]]:
    metrics: dict[int, dict[str, object]] = {}
    for key, value in flat.items():
        m = _HEAD_KEY.search(key)
        if m and isinstance(value, (int, float)):
            prefix = key[: m.start()].strip("/")
            metrics.setdefault(int(m[1]), {})[f"{prefix}/{m[2]}" if prefix else m[2]] = value
    return metrics


def _is_time(key: str, value) -> bool:
    leaf = key.rsplit("/", 1)[-1].lower()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and any(w in leaf for w in _TIME_WORDS)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h {m:02d}m {s % 60:02d}s" if h else f"{m}m {s % 60:02d}s" if m else f"{seconds:.1f} s"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _get(cfg: dict, *keys):
    for k in keys:
        if not isinstance(cfg, dict):
            return None
        cfg = cfg.get(k)
    return cfg


def _table(header: list[str], rows: list[tuple]) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rows_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return _table(columns, [tuple(_fmt(r.get(c)) for c in columns) for r in rows])
