"""medusa_train: train Medusa heads and draft models, decode faster, measure it."""

from medusa_train.heads import MedusaHeads, MedusaHeadsConfig
from medusa_train.model import MedusaModel, build_heads

__all__ = ["MedusaHeads", "MedusaHeadsConfig", "MedusaModel", "build_heads"]
__version__ = "0.1.0"
