"""What ALLoRA costs: training-step time and memory against LoRA, DoRA and the ALLoRA variants, interleaved.

All methods are adapters of **one** peft model (same frozen weights, same batch); each has its own AdamW. A round
runs one full training step (forward, backward, optimizer step) of every method, in an order rotated each round, so
slow drifts of a shared CPU hit all methods alike. Each method's time is divided by the reference's time *in the
same round* and the ratios are summarised by median and inter-quartile range. Two clocks: wall time, and the CPU
time of this process (``time.process_time``), which does not count the time another process held the cores (it
does count torch's threads spinning while they wait for each other, so it is not free of noise either). On a GPU
the step is timed with CUDA events (the kernels' time, not the launching) and the CPU clock is not reported.

Memory on a CPU: there is no allocator peak counter, and the process RSS is monotone and shared by all methods, so
each method's step is run once more under ``torch.profiler`` with ``profile_memory=True``; the allocation and free
events, summed in time order, give the peak of tensor memory allocated *during* the step (activations, gradients,
temporaries; optimizer state already exists after the warm-up). On a GPU the same quantity is
``torch.cuda.max_memory_allocated`` over the step minus what was allocated before it. The total adds the resident
tensors that method uses: the frozen model, its adapter weights and its optimizer state.

The methods are those of the benchmark's registry (``benchmarks/methods.py``), built from the same LoRA configs as
the accuracy runs, so the cost table and the accuracy table describe the same adapters.
"""

from __future__ import annotations

import logging
import time

from .methods import METHODS, OPTIM_PAIR, get_method

logger = logging.getLogger("benchmarks")

REFERENCE = OPTIM_PAIR[1]  # LoRA at alpha = r and dropout 0: ALLoRA without its coefficient


def _build(model, names):
    """Add one adapter per method to ``model``; return the peft model and ``{name: (optimizer, params)}``."""
    import torch
    from peft import get_peft_model

    from allora_trl import apply_allora
    from allora_trl.core.update_scaling import enable_update_scaling

    peft_model = None
    for name in names:
        method = get_method(name)
        if method.loraplus_ratio:
            raise ValueError(f"{name}: the cost phase gives every adapter one AdamW at one LR; LoRA+ has two")
        if peft_model is None:
            peft_model = get_peft_model(model, method.lora_config(), adapter_name=name)
        else:
            peft_model.add_adapter(name, method.lora_config())
        if method.trainer == "allora":
            apply_allora(peft_model, eta=method.eta, coefficient=method.coefficient, adapter_name=name)
    optimizers = {}
    for name in names:
        params = [p for n, p in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        if get_method(name).trainer == "allora" and get_method(name).scale == "update":
            peft_model.set_adapter(name)
            enable_update_scaling(optimizer, peft_model)
        optimizers[name] = (optimizer, params)
    return peft_model, optimizers


def _batch(tokenizer, tasks, batch_size, max_length, device):
    from .data import train_dataset

    rows = train_dataset(tasks, batch_size, seed=0)
    texts = [r["prompt"] + r["completion"] for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
        "labels": labels.to(device),
    }


def _step(model, optimizer, batch, dtype: str = "float32"):
    """One training step; in bfloat16, the forward under autocast as the Trainer runs it (``bf16=True``)."""
    import contextlib

    import torch

    device = batch["input_ids"].device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


class _Clock:
    """Seconds of one step: CUDA events on a GPU (kernel time, synchronised), ``perf_counter`` on a CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.torch.cuda.synchronize()
            self.seconds, self.cpu_seconds = self.start.elapsed_time(self.end) / 1000, None
        else:
            self.seconds, self.cpu_seconds = time.perf_counter() - self.t0, time.process_time() - self.c0
        return False


def _peak_step_bytes(model, optimizer, batch, dtype: str = "float32") -> int:
    """Peak of tensor bytes allocated during one step.

    On a GPU: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the step. On a CPU:
    the profiler's allocation and free events summed in time order.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if batch["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(model, optimizer, batch, dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, optimizer, batch, dtype)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _top_ops(model, optimizer, batch, dtype: str = "float32", k=8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, batch, dtype)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [{"op": r.key, "self_cpu_ms": r.self_cpu_time_total / 1000, "calls": r.count} for r in rows]


def measure_cost(
    tasks=("arc_easy",),
    batch_size: int = 8,
    max_length: int = 128,
    rounds: int = 10,
    warmup: int = 1,
    names=(REFERENCE, OPTIM_PAIR[0]),
    profile_ops: bool = True,
    model: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """Interleaved step times and peak memory of the registry methods ``names``, as ratios to ``REFERENCE``.

    See the module docstring; ``model``, ``dtype`` and ``device`` as in :func:`benchmarks.single_run.load_model`.
    """
    import torch

    from .single_run import load_model
    from .stats import median_iqr

    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"Unknown cost methods {unknown}: choose from {', '.join(METHODS)}.")
    if REFERENCE not in names:
        names = (REFERENCE, *names)
    torch.manual_seed(0)
    base, tokenizer, _ = load_model(model, dtype, device)
    frozen_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    peft_model, optimizers = _build(base, list(names))
    peft_model.train()
    batch = _batch(tokenizer, tasks, batch_size, max_length, device)
    tokens = int(batch["attention_mask"].sum())

    def activate(name):
        peft_model.set_adapter(name)
        return optimizers[name][0]

    for name in names:  # warm-up: creates optimizer state, fills caches
        optimizer = activate(name)
        for _ in range(warmup):
            _step(peft_model, optimizer, batch, dtype)

    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])  # rotate: no fixed position
        for name in order:
            optimizer = activate(name)
            with _Clock(device) as clock:
                _step(peft_model, optimizer, batch, dtype)
            times[name].append(clock.seconds)
            if clock.cpu_seconds is not None:
                cpu_times[name].append(clock.cpu_seconds)
        logger.info("cost round %d/%d: %s", r + 1, rounds, ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))

    memory, top_ops = {}, {}
    for name in names:
        optimizer = activate(name)
        peak = _peak_step_bytes(peft_model, optimizer, batch, dtype)
        adapter = sum(p.numel() * p.element_size() for p in optimizers[name][1])
        state = sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )
        memory[name] = {
            "step_peak_bytes": peak,
            "adapter_bytes": adapter,
            "optimizer_state_bytes": state,
            "total_bytes": frozen_bytes + adapter + state + peak,
        }
        if profile_ops and name in (REFERENCE, OPTIM_PAIR[0]):
            top_ops[name] = _top_ops(peft_model, optimizer, batch, dtype)

    ref_times, ref_cpu, ref_mem = times[REFERENCE], cpu_times[REFERENCE], memory[REFERENCE]
    methods = {}
    for name in names:
        ratios = [t / ref for t, ref in zip(times[name], ref_times)]
        cpu_ratios = [t / ref for t, ref in zip(cpu_times[name], ref_cpu)]
        methods[name] = {
            "description": get_method(name).summary,
            "step_s": median_iqr(times[name]),
            "time_ratio": median_iqr(ratios),
            "cpu_step_s": median_iqr(cpu_times[name]) if cpu_times[name] else None,
            "cpu_time_ratio": median_iqr(cpu_ratios) if cpu_ratios else None,
            "memory": memory[name],
            "step_peak_ratio": memory[name]["step_peak_bytes"] / ref_mem["step_peak_bytes"],
            "total_memory_ratio": memory[name]["total_bytes"] / ref_mem["total_bytes"],
            "times_s": times[name],
            "cpu_times_s": cpu_times[name],
        }
    return {
        "reference": REFERENCE,
        "rounds": rounds,
        "batch_size": batch_size,
        "max_length": max_length,
        "tokens": tokens,
        "padded_tokens": int(batch["input_ids"].numel()),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "frozen_bytes": frozen_bytes,
        "methods": methods,
        "top_ops": top_ops,
    }
