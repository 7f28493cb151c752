"""ALLoRA's fixed per-layer overhead where a training step is bound by launching operations, eager and compiled.

On a GPU with small batches the step time is set by how fast Python launches kernels, not by the kernels
(``benchmarks/results-gpu``): there every extra small operation per LoRA layer shows. This measures that regime
directly: a stack of small LoRA layers (so every operation is cheap and its launch dominates), plain peft LoRA
(alpha = r, dropout 0) against ALLoRA and ALLoRA with ``allora_scale="update"`` on the same weights, one whole
training step each (zero_grad, forward, backward, AdamW step: the per-step coefficient refresh and the update
hooks are inside it), interleaved rounds, median ratio. Then the same models under ``torch.compile`` (TRL's
``torch_compile=True``); the rule traces without graph breaks (``tests/test_coefficient_cache.py``).

    python -m benchmarks.launch_bound [--device cuda] [--layers 8] [--width 64] [--tokens 16] [--model llama]

``--model llama`` puts the LoRA layers where a fine-tune has them: a tiny Llama (``--layers`` decoder layers of
width ``--width``, LoRA on all seven linear layers of each), one sequence of ``--tokens`` random token ids, the
language-model loss; there attention, norms and the head dilute what the LoRA layers cost. The default, a plain
stack of LoRA layers, is the worst case: nothing but LoRA layers.

On a CPU this is a proxy (per-operation dispatch instead of kernel launches); on a GPU it is the real thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

METHODS = ("lora", "allora", "allora_update")
VOCAB = 256  # the tiny Llama's vocabulary


def build(method: str, layers: int, width: int, rank: int, device: str, kind: str = "stack"):
    """``(model, optimizer)``: ``layers`` LoRA-adapted linear layers (``kind="stack"``) or decoder layers of a tiny
    Llama with LoRA on every linear layer (``kind="llama"``), and its AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    from allora_trl import apply_allora
    from allora_trl.core.update_scaling import enable_update_scaling

    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        base, targets = LlamaForCausalLM(config).to(device), "all-linear"
    else:
        base = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
        targets = [str(i) for i in range(layers)]
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0))
    if method != "lora":
        apply_allora(model, eta=2.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # B != 0: the coefficient is not at its B = 0 value
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if method == "allora_update":
        enable_update_scaling(optimizer, model)
    return model, optimizer


def ratios(models: dict, x, rounds: int, steps: int, autocast: bool) -> tuple[dict, dict]:
    """Median over rounds of each method's time / LoRA's time for ``steps`` training steps, and the last times.

    ``models``: method -> (callable model, optimizer).
    """
    import torch

    def step(pair):
        model, optimizer = pair
        optimizer.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=x, labels=x).loss if x.dtype == torch.long else model(x)
        out.float().sum().backward()
        optimizer.step()

    def timed(pair):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(pair)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for pair in models.values():  # warm-up (and, for compiled models, compilation)
        for _ in range(5):
            step(pair)
    found = {name: [] for name in models if name != "lora"}
    for _ in range(rounds):
        times = {name: timed(pair) for name, pair in models.items()}
        for name in found:
            found[name].append(times[name] / times["lora"])
    return {name: statistics.median(r) for name, r in found.items()}, {name: t / steps for name, t in times.items()}


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed block")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--model", choices=("stack", "llama"), default="stack", help="a stack of LoRA layers, or a tiny Llama"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    autocast = args.device == "cuda"  # bf16 autocast on a GPU, as in training; fp32 on a CPU
    if args.model == "llama":
        x = torch.randint(0, VOCAB, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
        what = f"tiny Llama, {args.layers} decoder layers {args.width} wide ({7 * args.layers} LoRA layers)"
    else:
        x = torch.randn(args.tokens, args.width, device=args.device)
        what = f"{args.layers} LoRA layers {args.width}x{args.width}"
    models = {name: build(name, args.layers, args.width, args.rank, args.device, args.model) for name in METHODS}
    print(
        f"{what}, r={args.rank}, {args.tokens} tokens, {args.device}"
        f"{', bf16 autocast' if autocast else ', fp32'}; time of one training step (zero_grad, forward, backward, "
        f"AdamW step) / LoRA's, median of {args.rounds}"
    )
    variants = [("eager", models)]
    if not args.no_compile:
        compiled = {name: (torch.compile(model), opt) for name, (model, opt) in models.items()}
        variants.append(("compiled", compiled))
    for label, group in variants:
        found, per_step = ratios(group, x, args.rounds, args.steps, autocast)
        print(
            f"  {label:8s} {found['allora']:.3f}  update {found['allora_update']:.3f}  (per step: LoRA "
            f"{per_step['lora'] * 1e6:.0f} us, ALLoRA {per_step['allora'] * 1e6:.0f} us, update "
            f"{per_step['allora_update'] * 1e6:.0f} us)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
