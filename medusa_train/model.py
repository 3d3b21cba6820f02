"""A base causal LM plus Medusa heads, driven through public transformers APIs only.

The backbone runs as `base.get_decoder()` (post-final-norm hidden states), the base
lm_head is `base.get_output_embeddings()`. One backbone pass gives base logits and all
head logits; when the heads share the base lm_head both go through one matmul so the
vocabulary matrix is read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medusa_train.heads import MedusaHeads, MedusaHeadsConfig


@dataclass
class MedusaOutput:
    logits: torch.Tensor | None  # (B, T, V) base next-token logits
    head_logits: torch.Tensor  # (K, B, T, V') head logits
    hidden_states: torch.Tensor  # (B, T, H) last, post-norm
    past_key_values: object = None


class MedusaModel(nn.Module):
    def __init__(self, base: nn.Module, heads: MedusaHeads):
        super().__init__()
        check_compatible(base, heads.config)
        self.base = base
        self.heads = heads

    @property
    def decoder(self) -> nn.Module:
        return self.base.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def config(self):
        return self.base.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        return_base_logits: bool = True,
    ) -> MedusaOutput:
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state  # (B, T, H)
        logits, head_logits = self.logits_from_hidden(hidden, return_base_logits)
        return MedusaOutput(logits, head_logits, hidden, out.past_key_values if use_cache else None)

    def logits_from_hidden(self, hidden: torch.Tensor, return_base_logits: bool = True):
        """(B, T, H) -> base logits (B, T, V) or None, head logits (K, B, T, V')."""
        head_hidden = self.heads.transform(hidden)  # (K, B, T, H)
        if self.heads.lm_heads is None and not self.heads.truncated and return_base_logits:
            both = self.lm_head(torch.cat([hidden[None], head_hidden]))  # (1+K, B, T, V)
            return both[0], both[1:]
        logits = self.lm_head(hidden) if return_base_logits else None
        return logits, self.heads.project(head_hidden, self.lm_head)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save the heads only; the base model is named in their config."""
        return self.heads.save_pretrained(path)

    @classmethod
    def from_pretrained(
        cls,
        base: str | nn.Module | None,
        heads: str | Path,
        dtype: str = "auto",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> "MedusaModel":
        """Base (name, path, loaded module, or None = the one named in the heads' config) + heads folder or Hub repo.

        The heads may be native, vLLM or FasterDecoding (see medusa_train.export); pickle weight
        files (.pt/.bin) are read only with allow_pickle=True.
        """
        from medusa_train.training.lora import backbone_dir_for, load_backbone
        from medusa_train.export.formats import load_any_heads

        heads_path = resolve_heads_path(heads, allow_pickle=allow_pickle)
        medusa_heads = load_any_heads(heads_path, allow_pickle=allow_pickle)
        if base is None:
            base = medusa_heads.config.base_model
            if base is None:
                raise ValueError(f"heads in {heads_path} do not name their base model: pass base=")
        if not isinstance(base, nn.Module):
            # A Medusa-2 run's heads name their tuned backbone (LoRA adapter or merged model) too.
            base = load_backbone(base, backbone_dir_for(heads_path, medusa_heads.config), dtype=dtype,
                                 device=device, trust_remote_code=trust_remote_code)
        param = next(base.parameters())
        return cls(base, medusa_heads.to(param.device, param.dtype)).eval()


def resolve_heads_path(heads: str | Path, allow_pickle: bool = False) -> Path:
    """A local folder, or a Hub repo id downloaded with huggingface_hub (pickles only if allowed)."""
    path = Path(heads)
    if path.exists():
        return path
    if isinstance(heads, str) and heads.count("/") == 1 and not heads.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.md"] + (["*.pt", "*.bin"] if allow_pickle else [])
        return Path(snapshot_download(heads, allow_patterns=patterns))
    raise FileNotFoundError(f"no heads folder at {heads}")


def check_compatible(base: nn.Module, config: MedusaHeadsConfig) -> None:
    vocab, hidden = base.get_output_embeddings().weight.shape
    if hidden != config.hidden_size or vocab != config.vocab_size:
        raise ValueError(
            f"heads were made for hidden_size={config.hidden_size}, vocab_size={config.vocab_size} "
            f"(base model {config.base_model!r}) but this base model has hidden_size={hidden}, "
            f"vocab_size={vocab}"
        )


def build_heads(base: nn.Module, base_name: str | None = None, **head_kwargs) -> MedusaHeads:
    """Fresh heads sized for `base`, own projections initialised from its lm_head."""
    vocab_map = head_kwargs.pop("vocab_map", None)
    lm_head = base.get_output_embeddings()
    vocab, hidden = lm_head.weight.shape
    config = MedusaHeadsConfig(hidden_size=hidden, vocab_size=vocab, base_model=base_name, **head_kwargs)
    heads = MedusaHeads(config)
    heads.init_from_base(lm_head, vocab_map)
    param = next(base.parameters())
    return heads.to(param.device, param.dtype)
