"""CPU measurement behind docs/scaling-out.md (not a test): ALLoRA step time and memory, 1 process vs DDP vs FSDP2.

    python tests/distributed/bench_scaling.py --mode single
    torchrun --standalone --nproc_per_node 2 tests/distributed/bench_scaling.py --mode ddp
    torchrun --standalone --nproc_per_node 2 tests/distributed/bench_scaling.py --mode fsdp2

Prints, per process: parameter bytes held between steps (what FSDP2 shards), peak resident memory, and the median
step time of a small Llama (hidden 512, 8 layers, LoRA r=16 on all linear layers, fp32, global batch 8 x 128
tokens). On CPUs with gloo this measures the mechanics (what is sharded, what the collectives cost on this
machine), not GPU performance.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from allora_trl import apply_allora

GLOBAL_BATCH, SEQ = 8, 128


def held_parameter_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp2"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=SEQ,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    apply_allora(model)
    if args.mode == "fsdp2":
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif args.mode == "ddp":
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_rank = GLOBAL_BATCH // world
    data = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = data[rank * per_rank : (rank + 1) * per_rank]

    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.mode} rank {rank}/{world}: parameters held {held_parameter_bytes(model) / 2**20:.1f} MiB, "
        f"peak RSS {peak_mib:.0f} MiB, median step {statistics.median(times[1:]):.2f} s "
        f"(global batch {GLOBAL_BATCH}x{SEQ}, {per_rank} sequences per process)",
        flush=True,
    )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
