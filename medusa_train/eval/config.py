"""Structured schema of `conf/eval.yaml`: every default of the evaluation lives here.

A mistyped key or a wrong type fails when the config is composed, before a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class AccuracyConfig:
    """Head accuracy on the medusa1 held-out split (medusa_train/eval/accuracy.py)."""

    source: str = "self"  # self: the model's own greedy answers (what decoding sees) | data: reference answers
    num_prompts: int = 64  # held-out conversations used (at most the run's data.eval_max_rows)
    max_new_tokens: int = 128  # length of the self-generated answers
    topk: int = 10  # ranks measured per head
    batch_size: int = 8
    cache: bool = True  # keep the self answers (they depend on the base model only) in the medusa_train cache


@dataclass
class LatencyConfig:
    """Forward latency profile on this device (medusa_train/eval/latency.py)."""

    context_len: int = 256  # tokens in the KV cache under the tree
    repeats: int = 5  # timings per size; the median is kept
    calibrate: bool = True  # time whole runtime steps to measure its per-step overhead


@dataclass
class SearchConfig:
    """Greedy tree construction and budget choice (medusa_train/eval/tree_search.py)."""

    max_nodes: int = 64  # largest tree considered, root included
    estimator: str = "joint"  # joint | conditional | independent: how a path's probability is estimated
    save: bool = True  # write the chosen tree into the heads' medusa_heads.json (field `tree`)


@dataclass
class QualityConfig:
    """For heads trained with a tuned backbone (Medusa-2): how much the model's output changed
    against the original (medusa_train/eval/quality.py). Loads the original model too."""

    enabled: bool = True  # measured only when the heads come with a tuned backbone
    num_prompts: int = 32  # held-out prompts of the run's data split
    max_new_tokens: int = 128
    batch_size: int = 8


@dataclass
class EvalConfig:
    # Heads folder (runs/<name>/heads) or Hub repo id. On the command line `heads=PATH` works too:
    # `heads` is also the training config group conf/heads/, which Hydra would take it for,
    # so the eval entry point passes `heads=` on as `heads_dir=`.
    # None: no heads, only the draft-model methods (needs draft=).
    heads_dir: Optional[str] = None
    # None: the base model named in the heads' config (without heads: the embedded default model).
    base_model: Optional[str] = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    # Questions: mt_bench (bundled) or a path to a file in the MT-bench / Spec-Bench schema.
    bench: str = "mt_bench"
    num_questions: Optional[int] = None  # None: all; N: round-robin over categories
    max_turns: Optional[int] = None  # None: every turn; 1: first turns only
    max_new_tokens: int = 128
    # None: the heads' saved tree (else the runtime default); auto: search one here, save it,
    # and bench it; a name in medusa_train.runtime.TREES; or a choices list [[0],[0,0],[1]].
    tree: Optional[Any] = None
    methods: list[str] = field(default_factory=lambda: ["hf_generate", "runtime_ar", "medusa"])
    # A draft model (name or folder, e.g. runs/draft/draft): adds HF assisted generation
    # (hf_assisted), HF prompt lookup (hf_prompt_lookup) and our draft decoding (draft).
    draft: Optional[str] = None
    skip_bench: bool = False  # with tree=auto: search and save the tree only
    warmup: bool = True  # one short untimed run per method first
    output_dir: Optional[str] = None  # None: <heads folder>/../eval (a run's eval/ folder)
    progress: bool = True
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


def register_eval_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
