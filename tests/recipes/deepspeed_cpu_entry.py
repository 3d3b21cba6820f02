"""Test harness, not a test: `python -m medusa_train` under DeepSpeed on a machine without a GPU.

    accelerate launch --config_file <zero config> tests/recipes/deepspeed_cpu_entry.py <hydra args>

DeepSpeed itself runs on the CPU (its CPU accelerator, gloo collectives), but accelerate
only starts a DeepSpeed process group on a GPU. This script tells accelerate to use gloo
and the CPU device, allows DeepSpeed on the CPU in medusa_train (make_accelerator), and
runs the command line as usual. Only the tests use it.
"""

import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from medusa_train.training.distributed import DEEPSPEED_ON_CPU

_prepare_backend = PartialState._prepare_backend


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if found is None and not cpu:  # no GPU: DeepSpeed's CPU accelerator talks over gloo
        return "gloo", DistributedType.MULTI_GPU  # accelerate then switches the type to DEEPSPEED
    return found, kind


if __name__ == "__main__":
    os.environ[DEEPSPEED_ON_CPU] = "1"
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = _gloo_backend
    sys.argv = ["medusa_train", *sys.argv[1:]]
    runpy.run_module("medusa_train", run_name="__main__", alter_sys=True)
