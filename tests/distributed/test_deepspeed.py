"""ALLoRA under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, gloo) equals one-process training.

``deepspeed`` is in the ``test`` extra, so CI runs these; elsewhere they run where it is installed. This is
the DeepSpeed engine itself, started by ``torchrun``: the Trainer + ``accelerate launch`` DeepSpeed path cannot
form a process group on a machine without GPUs, so it is not exercised here (docs/scaling-out.md).
"""

from __future__ import annotations

import pytest
import torch
from dist_launch import torchrun
from test_fsdp2 import OPTIMIZER, STEPS, WEIGHT_ATOL, assert_tensors_close, single_process

pytest.importorskip("deepspeed")
assert OPTIMIZER == "adamw"  # deepspeed_worker.py configures the same torch AdamW


@pytest.fixture(scope="module")
def reference():
    return single_process(STEPS)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_single_process(tmp_path, reference, stage):
    # the first start on a machine compiles DeepSpeed's CPU communication extension (about a minute): a longer limit
    torchrun("deepspeed_worker.py", "--stage", str(stage), "--steps", str(STEPS), "--out", str(tmp_path), timeout_s=400)
    result = torch.load(tmp_path / "result.pt")
    for got, want in zip(result["layer_stats"], reference["layer_stats"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    lora = {k.removeprefix("module."): v for k, v in result["lora"].items()}
    worst = assert_tensors_close(lora, reference["lora"], WEIGHT_ATOL)
    print(f"ZeRO-{stage}: max |LoRA weight difference| vs one process: {worst:.2e}")
