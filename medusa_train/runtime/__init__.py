"""Tree-attention inference with Medusa heads: `medusa_generate(model, input_ids, ...)`."""

from medusa_train.runtime.acceptance import Acceptance
from medusa_train.runtime.generate import DecodeStats, GenerateOutput, medusa_generate
from medusa_train.runtime.tree import DEFAULT_TREE, MC_SIM_7B_63, TREES, Tree, build_tree, resolve_tree

__all__ = [
    "Acceptance",
    "DEFAULT_TREE",
    "DecodeStats",
    "GenerateOutput",
    "MC_SIM_7B_63",
    "TREES",
    "Tree",
    "build_tree",
    "medusa_generate",
    "resolve_tree",
]
