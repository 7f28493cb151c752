"""QLoRA (4-bit bitsandbytes base) + ALLoRA under DDP and FSDP2, 2 CPU processes, equals one process.

bitsandbytes' CPU backend quantises the tiny base model to NF4 (default uint8 storage). Under FSDP2 the 4-bit
weights are left out of sharding, as accelerate's ``fsdp2_prepare_model`` does for uint8-stored 4-bit weights; the
LoRA A/B and every other weight are sharded. (Sharding float-stored 4-bit weights with a bare ``fully_shard`` was
tried too: plain LoRA and ALLoRA alike drifted ~5e-2 from one process after 4 steps, so that path is not claimed;
see docs/scaling-out.md.)
"""

from __future__ import annotations

import pytest
import torch
from dist_common import save_base
from dist_launch import torchrun
from test_fsdp2 import OPTIMIZER, STEPS, WEIGHT_ATOL, assert_tensors_close, single_process

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory) -> str:
    return save_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def reference(qlora_base):
    return single_process(STEPS, qlora_dir=qlora_base)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_qlora_matches_single_process(tmp_path, qlora_base, reference, mode):
    torchrun(
        "torch_worker.py",
        "--mode",
        mode,
        "--optimizer",
        OPTIMIZER,
        "--steps",
        str(STEPS),
        "--qlora-dir",
        qlora_base,
        "--out",
        str(tmp_path),
    )
    result = torch.load(tmp_path / "result.pt")
    assert result["ranks_agree"]
    for got, want in zip(result["layer_stats"], reference["layer_stats"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    worst = assert_tensors_close(result["lora"], reference["lora"], WEIGHT_ATOL)
    print(f"QLoRA {mode}: max |LoRA weight difference| vs one process: {worst:.2e}")
