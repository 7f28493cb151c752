"""Worker for test_fsdp2.py, started by ``torchrun`` (the standard launcher): ALLoRA under torch FSDP2 or DDP.

Each process builds the same tiny ALLoRA model, wraps it the way accelerate does for ``fsdp_version: 2`` with
transformer-layer auto-wrap (``fully_shard`` on every decoder layer, then on the root) or with torch DDP, trains on
its half of each fixed global batch and writes, on rank 0, what the test compares with one process: the
coefficient statistics each LoRA layer recorded in its own forward pass (the coefficient its backward then
applies), the first step's full gradients, the final LoRA weights, and the adapter exported as a plain peft LoRA adapter.

``--save-checkpoint`` / ``--resume`` write / read a sharded torch.distributed.checkpoint (DCP) of the LoRA weights
and optimizer state, so the test can show that a run resumed from a sharded checkpoint equals an unbroken one.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_common import build_model, local_batch, lora_state, loss_on, make_optimizer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from allora_trl import collect_allora_stats, save_allora_adapter, set_allora_stats_recording
from allora_trl.core.model import allora_variants


def layer_stats(model) -> list[list[float]]:
    """Per-layer [min, max, sum] of the coefficient each ALLoRA layer recorded in its last forward (the one its
    backward applied)."""
    return [
        [v.stats.values[k].item() for k in ("coefficient_min", "coefficient_max", "coefficient_sum")]
        for v in allora_variants(model)
    ]


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every LoRA gradient as a full tensor (all-gathered from FSDP2 shards; a collective, so on every rank)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name.removeprefix("module.")] = grad.detach().cpu().clone()
    return grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fsdp2", "ddp"], required=True)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True, help="train steps [first-step, steps)")
    parser.add_argument("--save-checkpoint", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--qlora-dir", default=None, help="train on this base model loaded 4-bit (QLoRA)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(qlora_dir=args.qlora_dir)
    peft_model = model
    if args.mode == "fsdp2":
        # What accelerate's fsdp2_prepare_model does with TRANSFORMER_BASED_WRAP: one group per decoder layer,
        # then the root. Every LoRA layer lives inside a decoder layer, so its A and B are all-gathered when the
        # layer runs forward and again before it runs backward. 4-bit weights stored as uint8 are left out of
        # sharding (kept whole on every rank), as accelerate does for them (fsdp2_prepare_model, ignored_params).
        packed = {p for p in model.parameters() if type(p).__name__ == "Params4bit" and not p.is_floating_point()}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, ignored_params=packed or None)
        fully_shard(model, ignored_params=packed or None)
    else:
        model = DistributedDataParallel(model)
    optimizer = make_optimizer(model, args.optimizer)

    options = StateDictOptions(ignore_frozen_params=True)  # only the LoRA weights: the base is not trained
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=args.resume)
        load_options = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not in it
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=load_options
        )

    record = {"stats": [], "layer_stats": [], "grads": None, "loss": []}
    for step in range(args.first_step, args.steps):
        set_allora_stats_recording(peft_model, True)
        loss = loss_on(model, local_batch(step, rank, world))
        loss.backward()
        record["stats"].append(collect_allora_stats(peft_model))
        record["layer_stats"].append(layer_stats(peft_model))
        if step == args.first_step:
            record["grads"] = full_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        record["loss"].append(summed.item() / world)

    if args.save_checkpoint:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=args.save_checkpoint)

    # The per-step coefficient cache: how often it refreshed, and whether it saw sharded weights (FSDP2).
    caches = {id(v.cache): v.cache for v in allora_variants(peft_model)}.values()
    record["cache"] = {
        "refreshes": sum(c.refreshes for c in caches),
        "sharded": any(c.sharded for c in caches),
        "layers": len(list(allora_variants(peft_model))),
        "steps": args.steps - args.first_step,
    }
    # The coefficient is computed from full weights in every process: all ranks must have used the same one.
    gathered = [None] * world
    dist.all_gather_object(gathered, record["layer_stats"])
    record["ranks_agree"] = all(g == gathered[0] for g in gathered)

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    if rank == 0:
        record["lora"] = lora_state(full.items())
        # Export: load the gathered LoRA weights into an unsharded copy and save it as a plain peft adapter
        # (plus allora_config.json). With cpu_offload=True only rank 0 holds the full dict.
        export = build_model(qlora_dir=args.qlora_dir)
        missing = export.load_state_dict(record["lora"], strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        save_allora_adapter(export, os.path.join(args.out, "adapter"))
        torch.save(record, os.path.join(args.out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
