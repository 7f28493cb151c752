"""What ALLoRA costs: training-step time and memory against LoRA, DoRA and the ALLoRA variants, interleaved.

All methods are adapters of **one** peft model (same frozen weights, same batch); each has its own AdamW. A round
runs one full training step (forward, backward, optimiser step) of every method, in an order rotated each round, so
slow drifts of a shared CPU hit all methods alike. Each method's time is divided by the reference's time *in the
same round* and the ratios are summarised by median and inter-quartile range. Two clocks: wall time, and the CPU
time of this process (``time.process_time``), which does not count the time another process held the cores (it
does count torch's threads spinning while they wait for each other, so it is not free of noise either).

Memory on a CPU: there is no allocator peak counter, and the process RSS is monotone and shared by all methods, so
each method's step is run once more under ``torch.profiler`` with ``profile_memory=True``; the allocation and free
events, summed in time order, give the peak of tensor memory allocated *during* the step (activations, gradients,
temporaries; optimiser state already exists after the warm-up). The total adds the resident tensors that method
uses: the frozen model, its adapter weights and its optimiser state.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("benchmarks")

REFERENCE = "lora0"
COST_METHODS = {
    "lora0": "LoRA, alpha=r, dropout 0 (= ALLoRA-0: the reference)",
    "lora": "LoRA, alpha=2r, dropout 0.05 (the paper's baseline)",
    "allora": "ALLoRA eta=2 (weight coefficient, gradient scaling)",
    "allora_update": "ALLoRA eta=2, coefficient on the update (allora-trl's extension)",
    "allora_output": "ALLoRA eta=2, per-token output coefficient",
    "dora": "DoRA, alpha=2r, dropout 0",
}


def _build(model, names):
    """Add one adapter per method to ``model``; return the peft model and ``{name: (optimizer, hooks)}``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from allora_trl import apply_allora
    from allora_trl.core.update_scaling import enable_update_scaling

    def config(alpha, dropout, dora=False):
        return LoraConfig(r=16, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                          use_dora=dora, task_type="CAUSAL_LM")

    configs = {
        "lora0": config(16, 0.0), "lora": config(32, 0.05), "allora": config(16, 0.0),
        "allora_update": config(16, 0.0), "allora_output": config(16, 0.0), "dora": config(32, 0.0, dora=True),
    }
    peft_model = None
    for name in names:
        if peft_model is None:
            peft_model = get_peft_model(model, configs[name], adapter_name=name)
        else:
            peft_model.add_adapter(name, configs[name])
        if name.startswith("allora"):
            apply_allora(peft_model, eta=2.0, coefficient="output" if name == "allora_output" else "weight",
                         adapter_name=name)
    optimizers = {}
    for name in names:
        params = [p for n, p in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        if name == "allora_update":
            peft_model.set_adapter(name)
            enable_update_scaling(optimizer, peft_model)
        optimizers[name] = (optimizer, params)
    return peft_model, optimizers


def _batch(tokenizer, tasks, batch_size, max_length):
    from .data import train_dataset

    rows = train_dataset(tasks, batch_size, seed=0)
    texts = [r["prompt"] + r["completion"] for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def _peak_step_bytes(model, optimizer, batch) -> int:
    """Peak of tensor bytes allocated during one step, from the profiler's allocation/free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, optimizer, batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _top_ops(model, optimizer, batch, k=8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [{"op": r.key, "self_cpu_ms": r.self_cpu_time_total / 1000, "calls": r.count} for r in rows]


def measure_cost(tasks=("arc_easy",), batch_size: int = 8, max_length: int = 128, rounds: int = 10,
                 warmup: int = 1, names=tuple(COST_METHODS), profile_ops: bool = True) -> dict:
    """Interleaved step times and profiler memory of ``names`` (ratios to ``lora0``); see the module docstring."""
    import torch

    from .runner import load_model
    from .stats import median_iqr

    if REFERENCE not in names:
        names = (REFERENCE, *names)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model()
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model, optimizers = _build(model, list(names))
    model.train()
    batch = _batch(tokenizer, tasks, batch_size, max_length)
    tokens = int(batch["attention_mask"].sum())

    def activate(name):
        model.set_adapter(name)
        return optimizers[name][0]

    for name in names:  # warm-up: creates optimiser state, fills caches
        optimizer = activate(name)
        for _ in range(warmup):
            _step(model, optimizer, batch)

    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[: r % len(names)])  # rotate: no fixed position
        for name in order:
            optimizer = activate(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(model, optimizer, batch)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        logger.info("cost round %d/%d: %s", r + 1, rounds,
                    ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))

    memory, top_ops = {}, {}
    for name in names:
        optimizer = activate(name)
        peak = _peak_step_bytes(model, optimizer, batch)
        adapter = sum(p.numel() * p.element_size() for p in optimizers[name][1])
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        memory[name] = {"step_peak_bytes": peak, "adapter_bytes": adapter, "optimizer_state_bytes": state,
                        "total_bytes": frozen_bytes + adapter + state + peak}
        if profile_ops and name in (REFERENCE, "allora"):
            top_ops[name] = _top_ops(model, optimizer, batch)

    ref_times, ref_cpu, ref_mem = times[REFERENCE], cpu_times[REFERENCE], memory[REFERENCE]
    methods = {}
    for name in names:
        ratios = [t / ref for t, ref in zip(times[name], ref_times)]
        cpu_ratios = [t / ref for t, ref in zip(cpu_times[name], ref_cpu)]
        methods[name] = {
            "description": COST_METHODS.get(name, name),
            "step_s": median_iqr(times[name]),
            "time_ratio": median_iqr(ratios),
            "cpu_step_s": median_iqr(cpu_times[name]),
            "cpu_time_ratio": median_iqr(cpu_ratios),
            "memory": memory[name],
            "step_peak_ratio": memory[name]["step_peak_bytes"] / ref_mem["step_peak_bytes"],
            "total_memory_ratio": memory[name]["total_bytes"] / ref_mem["total_bytes"],
            "times_s": times[name],
            "cpu_times_s": cpu_times[name],
        }
    return {"reference": REFERENCE, "rounds": rounds, "batch_size": batch_size, "max_length": max_length,
            "tokens": tokens, "padded_tokens": int(batch["input_ids"].numel()), "torch_threads": torch.get_num_threads(),
            "frozen_bytes": frozen_bytes, "methods": methods, "top_ops": top_ops}
