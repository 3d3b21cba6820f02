"""Structured config schemas: the single home of every default.

Each YAML under conf/ names only the values that differ from these. Hydra validates the
composed config against the dataclasses, so a typo in a key or a wrong type fails at
composition, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # An embedded name (smollm2-135m-instruct), an HF model id, or a local folder.
    name_or_path: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class DataConfig:
    # Local JSON/JSONL files (relative to the cwd or the repo root) or HF dataset ids.
    # Default: the embedded model's own answers to bundled prompts (self-distilled, see data/SOURCES.md).
    sources: list[str] = field(default_factory=lambda: ["data/default_self_distill.jsonl"])
    format: str = "auto"  # auto | sharegpt | messages | instruction | qa | completion | prompt
    split: str = "train"
    max_length: int = 512
    max_rows: int | None = None
    eval_fraction: float = 0.05
    eval_max_rows: int = 100
    seed: int = 0


@dataclass
class HeadsConfig:
    num_heads: int = 4
    num_layers: int = 1
    lm_head: str = "shared"  # shared | own
    # Project heads onto the N most frequent training tokens only (None: full vocabulary).
    truncated_vocab_size: int | None = None


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"  # any name transformers.get_scheduler knows
    max_grad_norm: float = 1.0
    decay: float = 0.8  # head k's loss weight is heads_coefficient * decay**k
    heads_coefficient: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    # Compute the frozen backbone's last hidden states once (on disk, memory-mapped) and
    # train the heads from them.
    hidden_cache: bool = True
    hidden_cache_dtype: str = "float16"  # float16 | float32
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    on_nan: str = "stop"  # stop | skip
    # Stop (with a checkpoint) after this many optimizer steps of *this* invocation;
    # used by tests to simulate a kill. None: run to max_steps.
    stop_after_steps: int | None = None


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "medusa_train"
    run_name: str | None = None
    mode: str = "auto"  # auto: online with WANDB_API_KEY (or a wandb login), else offline


@dataclass
class SelfDistillConfig:
    """The base model answers the data's user turns itself (recipe self_distill)."""

    output_file: str = "${output_dir}/self_distill.jsonl"
    batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    chunk_size: int = 64  # conversations answered between two fsynced appends (raised to batch_size if smaller)
    max_turns: int | None = None  # answer at most this many user turns per conversation


@dataclass
class Medusa2Config:
    """Medusa-2 (recipe medusa2): stage 1 trains the heads alone (the medusa1 recipe), stage 2
    trains them jointly with the backbone. Stage 2 minimises
        L_backbone + heads_coefficient * schedule(t) * sum_k train.decay**k * L_head_k.
    The backbone trains at train.lr, the heads at train.lr * head_lr_multiplier (both stages).
    """

    stages: list[int] = field(default_factory=lambda: [1, 2])
    # Heads to start stage 2 from when stage 1 is not run; default <output_dir>/stage1/heads.
    stage1_heads: str | None = None
    stage1_max_steps: int | None = None  # None: train.max_steps
    stage1_heads_coefficient: float = 0.2  # stage 1's train.heads_coefficient
    # Stage 2: lambda(t) = heads_coefficient * schedule(t). It sets how far the heads pull the
    # backbone from the original: on SmolLM2-135M, 0.1 gave greedy agreement 0.914, 0.03 gave 0.960
    # (with tau still above equal-budget Medusa-1), 0.01 gave 0.983 (eval/README.md, Medusa-2 results).
    heads_coefficient: float = 0.03
    schedule: str = "constant"  # constant | linear | sine | sine_<r> (sine over the first fraction r, then 1)
    head_lr_multiplier: float = 4.0
    backbone: str = "lora"  # lora | full (every backbone weight; fp32 weights, autocast on GPU)
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # peft target_modules; all-linear: every linear layer of the decoder blocks (attention and
    # MLP projections), not the output lm_head.
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    qlora: bool = False  # 4-bit NF4 frozen base (bitsandbytes, CUDA) under the LoRA adapter
    gradient_checkpointing: bool = False
    # ce: next-token CE on the data's labels; kl: KL(original || tuned) next-token distributions
    # at labelled positions (self-distillation); auto: kl when the data is self-distilled (a
    # <file>.meta.json written by the self_distill recipe next to a data file, or the flag below).
    backbone_loss: str = "auto"
    data_is_self_distilled: bool = False
    # auto: the LoRA adapter (lora) or the whole model (full); merged: LoRA merged into the base.
    save: str = "auto"  # auto | adapter | merged
    # The end-of-run check (KL loss): warn when the tuned model's greedy next token matches the
    # original's at fewer than this fraction of held-out answer tokens.
    min_agreement: float = 0.95


@dataclass
class DraftConfig:
    """A draft model for speculative decoding (recipe draft): built from the target
    (model.name_or_path), then distilled from it. Saved as a plain HF folder."""

    init: str = "layers"  # layers | config | model (see medusa_train/draft/build.py)
    # init=layers: the target layers the draft keeps (with the target's embeddings, final norm
    # and lm_head). SmolLM2-135M has 30: first, last and two evenly between, 4/30 of its layers.
    layers: list[int] = field(default_factory=lambda: [0, 10, 20, 29])
    # init=config: the target's config with these changes, e.g. {num_hidden_layers: 4}.
    config_overrides: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # init=model: an HF id or folder sharing the target's tokenizer
    loss: str = "fkl"  # fkl | rkl | tvd | ce (on the target's greedy token)
    temperature: float = 1.0  # applied to draft and target logits alike
    target_logits: str = "online"  # online: a target forward per batch | cache: top-k on disk, reused
    cache_top_k: int = 64  # the held-out split is always cached at this k (for eval)
    cache_dtype: str = "float16"  # of the cached log-probs: float16 | float32
    cache_dir: str = "${output_dir}/target_cache"  # point several runs at one folder to share it
    # Train and save a projection onto the N most frequent training tokens (draft_vocab.safetensors
    # beside the HF files, for our runtime); None: the full vocabulary.
    truncated_vocab_size: int | None = None
    # false: the embeddings and lm_head stay the target's (tied in SmolLM2: 28M of the draft's
    # 43M parameters); freshly initialised ones (init=config with another hidden size) always train.
    train_embeddings: bool = False
    measure_latency: bool = True  # time one decode step of target and draft(s) for the summary


@dataclass
class RecipeConfig:
    name: str = MISSING  # medusa1 | ... : module medusa_train.recipes.<name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    self_distill: SelfDistillConfig = field(default_factory=SelfDistillConfig)
    medusa2: Medusa2Config = field(default_factory=Medusa2Config)
    draft: DraftConfig = field(default_factory=DraftConfig)
    output_dir: str = MISSING
    resume: bool = False
    overwrite: bool = False
    seed: int = 42
    # Free-form room for launch metadata a recipe header wants to record.
    notes: Any | None = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [("model", ModelConfig), ("data", DataConfig), ("heads", HeadsConfig),
                        ("train", TrainConfig), ("logger", LoggerConfig)]:
        cs.store(group=group, name=f"base_{group}", node=node)
