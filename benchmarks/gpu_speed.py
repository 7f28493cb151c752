"""ALLoRA's step time against LoRA's on a GPU at the recorded shapes, eager and compiled: the lent-GPU script.

One prepared run for a lent GPU machine (about 6-8 minutes on an H200; ``benchmarks/results-gpu/README.md``). For
each shape of the recorded cost runs (random weights in the shapes of SmolLM2-135M and of a 1.1B Llama: a step's
time does not depend on the values, and the lent machine has no model files), three adapters on copies of one
bf16 base: LoRA (alpha = r, dropout 0: ALLoRA without its coefficient), ALLoRA, and ALLoRA with
``allora_scale="update"``; r = 16 on all linear layers, each with its own AdamW. One whole training step each
(zero_grad, forward under bf16 autocast, backward, optimizer step), in rotated order, ``--steps`` steps per timed
block, ``--rounds`` rounds; the ratio to LoRA of the same round, median [IQR]. Then the same under
``torch.compile`` for the shapes in ``--compile-shapes``. Random token ids stand in for data (no tokenizer
needed). Results go to ``--out`` as JSON, one file per run.

    python -m benchmarks.gpu_speed --out benchmarks/results-gpu/speed.json
    python -m benchmarks.gpu_speed --shapes tiny --device cpu --rounds 2 --steps 1 --compile-shapes tiny   # check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

MODELS = {
    # hidden, intermediate, layers, heads, kv heads, vocabulary
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152,
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128,
    ),
}  # fmt: skip
SHAPES = {  # the recorded cost runs (benchmarks/results-gpu/cost-*.json): model, batch, tokens
    "135m-b16-l256": ("135m", 16, 256),
    "135m-b64-l512": ("135m", 64, 512),
    "1b-b4-l128": ("1b", 4, 128),
    "1b-b16-l256": ("1b", 16, 256),
    "tiny": ("tiny", 2, 16),
}
DEFAULT_SHAPES = "135m-b16-l256,135m-b64-l512,1b-b4-l128,1b-b16-l256"
METHODS = ("lora", "allora", "allora_update")


def build(method: str, base, rank: int):
    """A peft copy of ``base`` with ``method``'s adapter, and its AdamW."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from allora_trl import apply_allora
    from allora_trl.core.update_scaling import enable_update_scaling

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear")
    )
    if method != "lora":
        apply_allora(model, eta=2.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)  # B != 0, as after the first steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if method == "allora_update":
        enable_update_scaling(optimizer, model)
    return model, optimizer


def time_shape(shape: str, device: str, rounds: int, steps: int, compiled: bool, rank: int = 16) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_name, batch, tokens = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**MODELS[model_name])).to(dtype)
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (batch, tokens), device=device)
    runs = {}
    for method in METHODS:
        model, optimizer = build(method, base, rank)
        runs[method] = (torch.compile(model) if compiled else model, optimizer)
    del base

    def step(method):
        model, optimizer = runs[method]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for method in METHODS:  # warm-up (compilation included)
        for _ in range(3):
            step(method)
    sync()
    times = {method: [] for method in METHODS}
    for index in range(rounds):
        order = METHODS[index % 3 :] + METHODS[: index % 3]
        for method in order:
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step(method)
            sync()
            times[method].append((time.perf_counter() - start) / steps)
    result = {"shape": shape, "batch": batch, "tokens": tokens, "compiled": compiled, "lora_step_ms": None}
    result["lora_step_ms"] = round(statistics.median(times["lora"]) * 1e3, 3)
    for method in METHODS[1:]:
        ratios = sorted(a / b for a, b in zip(times[method], times["lora"]))
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        result[method] = {
            "median": round(statistics.median(ratios), 4),
            "iqr": [round(quartiles[0], 4), round(quartiles[2], 4)],
        }
    runs.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--compile-shapes", default="135m-b16-l256,1b-b4-l128", help="also timed compiled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    compile_shapes = [s for s in args.compile_shapes.split(",") if s]
    unknown = sorted(set(shapes + compile_shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    results = []
    for compiled, group in ((False, shapes), (True, compile_shapes)):
        for shape in group:
            found = time_shape(shape, args.device, args.rounds, args.steps, compiled)
            results.append(found)
            print(
                f"{shape:15s} {'compiled' if compiled else 'eager':8s} LoRA {found['lora_step_ms']:.1f} ms/step  "
                f"ALLoRA {found['allora']['median']:.3f} {found['allora']['iqr']}  "
                f"update {found['allora_update']['median']:.3f} {found['allora_update']['iqr']}",
                flush=True,
            )
    if args.out:
        import transformers

        machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
        record = {
            "machine": machine,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "rounds": args.rounds,
            "steps": args.steps,
            "results": results,
        }
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
