"""Worker for test_deepspeed.py, started by ``torchrun``: ALLoRA under a DeepSpeed ZeRO-2 or ZeRO-3 engine on CPU.

``stage3_param_persistence_threshold: 0`` makes ZeRO-3 partition every parameter, the LoRA A and B included (by
default DeepSpeed keeps parameters under 1e5 elements whole, which would hide the case of real models, whose LoRA
matrices are often larger). ALLoRA's layer reads A and B inside the LoRA layer's forward, not inside their own
``nn.Linear`` forward; DeepSpeed gathers such parameters on access and registers them with the running module, so
they are whole in forward and again in backward. The test shows the coefficients and the result equal one process.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from dist_common import GLOBAL_BATCH, build_model, local_batch, loss_on  # noqa: E402

from allora_trl import set_allora_stats_recording  # noqa: E402
from allora_trl.core.model import allora_variants  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=[2, 3], required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        # torch's own AdamW with the test's settings (dist_common.make_optimizer), so one process can match it
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
    }
    model = build_model()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    if args.stage == 3:  # every LoRA matrix really is partitioned: each rank holds only a slice of it
        assert all(p.ds_tensor.numel() < p.ds_numel for n, p in model.named_parameters() if "lora_" in n)
    layer_stats = []
    for step in range(args.steps):
        set_allora_stats_recording(model, True)
        engine.backward(loss_on(engine, local_batch(step, rank, world)))
        layer_stats.append(
            [
                [v.stats.values[k].item() for k in ("coefficient_min", "coefficient_max", "coefficient_sum")]
                for v in allora_variants(model)
            ]
        )
        engine.step()
    lora = {
        n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    if rank == 0:
        torch.save({"lora": lora, "layer_stats": layer_stats}, os.path.join(args.out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()  # leaving with the group open can abort in its teardown


if __name__ == "__main__":
    main()
