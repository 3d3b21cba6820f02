"""Medusa decoding heads: (B, T, H) last hidden states -> (K, B, T, V) logits.

Head k (0-based) at position t predicts the token at t + k + 2: the base model's own
lm_head predicts t + 1, so head 0 is "one further". See `medusa_train.loss.head_targets`.

This module knows nothing about training, data or the base model beyond two numbers
(hidden size, vocabulary size) and, when the heads share it, the base lm_head module
that the caller passes in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "medusa_heads.json"
WEIGHTS_NAME = "medusa_heads.safetensors"
FORMAT_VERSION = 1


@dataclass
class MedusaHeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    # "shared": project with the base model's lm_head (no extra vocabulary matrix to read
    # per step); "own": each head has its own projection, initialised from the base lm_head.
    lm_head: str = "shared"
    # Project onto only the most frequent tokens (rows `vocab_map` of the base lm_head when
    # shared; own smaller matrices otherwise); `vocab_map` maps head ids back to full ids.
    truncated_vocab_size: int | None = None
    base_model: str | None = None
    # Tree of top-k index paths chosen for these heads (Medusa "choices"); None = runtime default.
    tree: list[list[int]] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lm_head not in ("shared", "own"):
            raise ValueError(f"heads lm_head must be 'shared' or 'own', got {self.lm_head!r}")
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError(
                f"need num_heads >= 1 and num_layers >= 0, got {self.num_heads}, {self.num_layers}"
            )
        if self.truncated_vocab_size is not None:
            if not 0 < self.truncated_vocab_size <= self.vocab_size:
                raise ValueError(
                    f"truncated_vocab_size must be in 1..{self.vocab_size}, got {self.truncated_vocab_size}"
                )


class ResBlock(nn.Module):
    """x + SiLU(W x + b), zero-initialised so the block starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, config: MedusaHeadsConfig):
        super().__init__()
        self.config = config
        # One fresh module per block: `[ResBlock(h)] * n` would share one module n times.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(config.hidden_size) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        self.lm_heads = None
        if config.lm_head == "own":
            out_size = config.truncated_vocab_size or config.vocab_size
            self.lm_heads = nn.ModuleList(
                nn.Linear(config.hidden_size, out_size, bias=False) for _ in range(config.num_heads)
            )
        # Head-vocabulary id -> full vocabulary id; identity when not truncated.
        vocab_map = torch.arange(config.truncated_vocab_size or config.vocab_size)
        self.register_buffer("vocab_map", vocab_map, persistent=False)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def truncated(self) -> bool:
        return self.config.truncated_vocab_size is not None

    def init_from_base(self, base_lm_head: nn.Module, vocab_map: torch.Tensor | None = None) -> None:
        """Set the truncated vocabulary, and copy the base lm_head rows into own projections."""
        if self.truncated:
            if vocab_map is None or vocab_map.numel() != self.config.truncated_vocab_size:
                raise ValueError("truncated heads need a vocab_map of truncated_vocab_size token ids")
            self.vocab_map = vocab_map.to(self.vocab_map.device, torch.long)
        if self.lm_heads is None:
            return
        weight = base_lm_head.weight.detach()
        if self.truncated:
            weight = weight[self.vocab_map.to(weight.device)]
        with torch.no_grad():
            for lm_head in self.lm_heads:
                lm_head.weight.copy_(weight)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (K, B, T, H): each head's residual blocks."""
        return torch.stack([block(hidden) for block in self.blocks])

    def project(self, head_hidden: torch.Tensor, base_lm_head: nn.Module | None = None) -> torch.Tensor:
        """(K, B, T, H) -> (K, B, T, V'), V' = truncated_vocab_size or vocab_size."""
        if self.lm_heads is None:
            if base_lm_head is None:
                raise ValueError("these heads share the base lm_head: pass it as base_lm_head")
            # One matmul for all K heads: the vocabulary matrix is read once.
            if not self.truncated:
                return base_lm_head(head_hidden)
            bias = getattr(base_lm_head, "bias", None)
            return F.linear(head_hidden, self.shared_weight(base_lm_head.weight), None if bias is None else bias[self.vocab_map])
        return torch.stack([lm_head(h) for lm_head, h in zip(self.lm_heads, head_hidden)])

    def shared_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Rows `vocab_map` of the base lm_head weight, re-gathered only when that weight changes."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight[self.vocab_map]  # trained backbone: keep the gather in the autograd graph
        if getattr(self, "_shared_key", None) != key:
            self._shared_weight, self._shared_key = weight.detach()[self.vocab_map], key
        return self._shared_weight

    def forward(self, hidden: torch.Tensor, base_lm_head: nn.Module | None = None) -> torch.Tensor:
        return self.project(self.transform(hidden), base_lm_head)  # (K, B, T, V')

    def to_head_vocab(self, token_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Full-vocabulary ids -> head-vocabulary ids; ids outside a truncated vocab -> ignore_index."""
        if not self.truncated:
            return token_ids
        lookup = torch.full((self.config.vocab_size,), ignore_index, dtype=torch.long, device=token_ids.device)
        lookup[self.vocab_map] = torch.arange(self.vocab_map.numel(), device=token_ids.device)
        valid = token_ids >= 0
        return torch.where(valid, lookup[token_ids.clamp(min=0)], torch.full_like(token_ids, ignore_index))

    # ---- files -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write `medusa_heads.json` and `medusa_heads.safetensors` into `path` (atomic per file)."""
        from medusa_train.training.checkpoint import atomic_write

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.truncated:
            tensors["vocab_map"] = self.vocab_map.cpu()
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(asdict(self.config), indent=2)))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "MedusaHeads":
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no Medusa heads in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(FasterDecoding or vLLM folders: use medusa_train.export to import them)"
            )
        raw = json.loads(config_file.read_text())
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{config_file} has format_version {raw['format_version']}; this medusa_train reads "
                f"up to {FORMAT_VERSION}: upgrade medusa_train"
            )
        known = MedusaHeadsConfig.__dataclass_fields__
        config = MedusaHeadsConfig(**{k: v for k, v in raw.items() if k in known})
        heads = cls(config)
        tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
        vocab_map = tensors.pop("vocab_map", None)
        heads.load_state_dict(tensors)
        if vocab_map is not None:
            heads.vocab_map = vocab_map.long()
        return heads.to(device)
