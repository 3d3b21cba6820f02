"""Export Medusa heads to the formats serving engines read, import published heads, push to the Hub.

    python -m medusa_train.export run_dir=runs/medusa1 format=vllm hub.push=true hub.repo_id=me/heads

Formats: native (medusa_train), vllm (vLLM's Medusa model), fasterdecoding (FasterDecoding/Medusa,
read by TensorRT-LLM and TGI). `load_any_heads` reads all three back.
"""

from medusa_train.export.common import PickleRefusedError
from medusa_train.export.fasterdecoding import load_fasterdecoding, save_fasterdecoding
from medusa_train.export.formats import FORMATS, detect_format, load_any_heads
from medusa_train.export.hub import HubAuthError, HubConnectionError, HubError, push_to_hub
from medusa_train.export.runs import export_run, find_run
from medusa_train.export.vllm import load_vllm, save_vllm

__all__ = [
    "FORMATS",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "PickleRefusedError",
    "detect_format",
    "export_run",
    "find_run",
    "load_any_heads",
    "load_fasterdecoding",
    "load_vllm",
    "push_to_hub",
    "save_fasterdecoding",
    "save_vllm",
]
