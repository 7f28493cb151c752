"""Step time of ``adapter: allora`` with Axolotl's three fused LoRA kernels against ``adapter: lora`` with them.

Issue 18's measurement (goal: ALLoRA at most 1.02x LoRA): the same random-weight Llama-shaped model and batch,
peft LoRA (r = alpha, dropout 0) on every linear layer of the decoder, patched exactly as Axolotl 0.19 patches it
(``patch_self_attn_lora`` on the attention class, ``apply_lora_kernel_patches`` on the model: ``lora_qkv_kernel``,
``lora_o_kernel``, ``lora_mlp_kernel``); for ALLoRA, ``apply_allora`` first and then the plugin's
``install_allora_kernels`` swaps ALLoRA's versions in. One whole training step each (zero_grad, forward under
bf16 autocast as Axolotl's ``bf16: true`` trains, backward, AdamW step: the per-step coefficient refresh is inside
it), interleaved rounds so that clock drift hits both alike, median of the per-round ratios. Without kernels
(peft's own layers, ``--no-kernel-baselines`` to skip) for context.

Needs a CUDA GPU and Axolotl 0.19 importable (its Triton SwiGLU, CUDA NF4 dequantisation); run from a source
checkout::

    python -m benchmarks.axolotl_kernels_gpu --out benchmarks/results-gpu/axolotl-kernels.json
    python -m benchmarks.axolotl_kernels_gpu --preset smollm2-135m --batch 16 --seq 256

``--dry-run`` runs the same code on a tiny model on the CPU for one round (the qkv and o kernels only: Axolotl's
Triton MLP kernel needs CUDA) to check the plumbing; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

# Llama shapes (random weights: step time does not depend on their values).
PRESETS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora_kernels", "allora_kernels", "lora", "allora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--four-bit", action="store_true", help="a bitsandbytes NF4 base (QLoRA), as load_in_4bit")
    parser.add_argument("--no-kernel-baselines", action="store_true", help="skip peft's own (unfused) layers")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, one round (plumbing only)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.seq, args.rank = "tiny", 2, 16, 4
        args.rounds, args.steps, args.warmup, args.four_bit = 1, 1, 1, False
    for name in ("batch", "seq", "rank", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def methods(args) -> tuple[str, ...]:
    return METHODS[:2] if args.no_kernel_baselines else METHODS


def build(method: str, args, model_dir: str, device: str):
    """``(model, optimizer)`` for one method, patched as Axolotl patches a model with its kernels on."""
    import torch
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches, patch_self_attn_lora
    from axolotl.utils.dict import DictDefault
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from allora_trl import apply_allora
    from allora_trl.integrations.axolotl.kernels import install_allora_kernels

    torch.manual_seed(0)
    kwargs = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if args.four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    base = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": device}, **kwargs)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)  # LoRA weights in fp32 (peft's autocast_adapter_dtype), as in Axolotl
    if method.startswith("allora"):
        apply_allora(model, eta=2.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)  # B != 0: coefficients away from their B = 0 value
    # The attention class is rewritten once for the process (to call apply_qkv / apply_o); every model then gets
    # Axolotl's per-instance binding: its kernels, or (all switches off) peft's own projections.
    kernels = method.endswith("_kernels")
    cfg = DictDefault(
        base_model=model_dir,
        lora_qkv_kernel=kernels,
        lora_o_kernel=kernels,
        lora_mlp_kernel=kernels and device == "cuda",  # Axolotl's MLP kernel runs Triton: CUDA only
    )
    patch_self_attn_lora(DictDefault(base_model=model_dir))  # idempotent: "already patched" after the first
    apply_lora_kernel_patches(model, cfg)
    counts = install_allora_kernels(model) if method == "allora_kernels" else None
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, counts


def step(model, optimizer, batch, device: str) -> None:
    import torch

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()


def measure(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run to check the plumbing on the CPU")
    model_dir = tempfile.mkdtemp(prefix="axolotl-kernels-model-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(args.seq, 128))).save_pretrained(
        model_dir
    )
    batch = torch.randint(0, PRESETS[args.preset]["vocab_size"], (args.batch, args.seq), device=device)

    built, counts = {}, {}
    for method in methods(args):
        model, optimizer, count = build(method, args, model_dir, device)
        built[method] = (model, optimizer)
        if count is not None:
            counts[method] = count
    for model, optimizer in built.values():
        for _ in range(args.warmup):
            step(model, optimizer, batch, device)

    def timed(pair) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(*pair, batch, device)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    per_round = {m: [] for m in built}
    for _ in range(args.rounds):
        for method, pair in built.items():
            per_round[method].append(timed(pair))
    ratio = [a / b for a, b in zip(per_round["allora_kernels"], per_round["lora_kernels"])]
    result = {
        "what": "step time, adapter: allora with Axolotl's fused LoRA kernels vs adapter: lora with them",
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "four_bit": args.four_bit,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: times mean nothing)",
        "torch": torch.__version__,
        "kernels_swapped": counts.get("allora_kernels"),
        "step_ms_median": {m: 1000 * statistics.median(t) for m, t in per_round.items()},
        "allora_over_lora_kernels_median": statistics.median(ratio),
        "allora_over_lora_kernels_per_round": ratio,
    }
    if "allora" in per_round:
        result["allora_over_lora_unfused_median"] = statistics.median(
            a / b for a, b in zip(per_round["allora"], per_round["lora"])
        )
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
