"""ALLoRA's fixed per-layer overhead where a training step is bound by launching operations, eager and compiled.

On a GPU with small batches the step time is set by how fast Python launches kernels, not by the kernels
(``benchmarks/results-gpu``): there ALLoRA's extra small operations per LoRA layer (the r x r Gram matrix, the row
norms, the coefficient, a custom autograd function) show as 1.3-1.4x. This measures that regime directly: a stack
of small LoRA layers (so every operation is cheap and its launch dominates), plain peft LoRA (alpha = r, dropout 0)
against ALLoRA on the same weights, forward + backward, interleaved rounds, median ratio. Then the same two models
under ``torch.compile``, which fuses the small operations (TRL's ``torch_compile=True``); the rule traces without
graph breaks (``tests/test_compile.py``).

    python -m benchmarks.launch_bound [--device cuda] [--layers 8] [--width 64] [--tokens 16]

On a CPU this is a proxy (per-operation dispatch instead of kernel launches); on a GPU it is the real thing.
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(allora: bool, layers: int, width: int, rank: int, device: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from allora_trl import apply_allora

    torch.manual_seed(0)
    stack = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    targets = [str(i) for i in range(layers)]
    model = get_peft_model(stack, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0))
    if allora:
        apply_allora(model, eta=2.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # B != 0: the coefficient is not at its B = 0 value
    return model


def ratios(models: dict, x, rounds: int, steps: int, autocast: bool) -> tuple[float, dict]:
    """Median over rounds of ALLoRA's time / LoRA's time for ``steps`` forward+backward passes, and the last times."""
    import torch

    def step(model):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().sum().backward()

    def timed(model):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(model)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model in models.values():  # warm-up (and, for compiled models, compilation)
        for _ in range(5):
            step(model)
    found = []
    for _ in range(rounds):
        times = {name: timed(model) for name, model in models.items()}
        found.append(times["allora"] / times["lora"])
    return statistics.median(found), {name: t / steps for name, t in times.items()}


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="forward+backward passes per timed block")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    autocast = args.device == "cuda"  # bf16 autocast on a GPU, as in training; fp32 on a CPU
    x = torch.randn(args.tokens, args.width, device=args.device)
    models = {
        name: build(name == "allora", args.layers, args.width, args.rank, args.device) for name in ("lora", "allora")
    }
    print(
        f"{args.layers} LoRA layers {args.width}x{args.width}, r={args.rank}, {args.tokens} tokens, {args.device}"
        f"{', bf16 autocast' if autocast else ', fp32'}; ALLoRA / LoRA forward+backward time, median of {args.rounds}"
    )
    variants = [("eager", models)]
    if not args.no_compile:
        variants.append(("compiled", {name: torch.compile(model) for name, model in models.items()}))
    for label, group in variants:
        ratio, per_step = ratios(group, x, args.rounds, args.steps, autocast)
        print(
            f"  {label:8s} {ratio:.3f}  (per pass: LoRA {per_step['lora'] * 1e6:.0f} us, "
            f"ALLoRA {per_step['allora'] * 1e6:.0f} us)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
