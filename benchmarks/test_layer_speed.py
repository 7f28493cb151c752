"""Micro-benchmark: one LoRA layer's forward + backward, vanilla peft LoRA vs ALLoRA (and the update-scaled step).

Run: ``python -m pytest benchmarks/test_layer_speed.py --benchmark-only`` (not collected by the default test run,
whose ``testpaths`` is ``tests``). The layer is SmolLM2-135M's MLP up-projection (576 -> 1536), rank 16, a batch of
512 tokens, float32 on the CPU, one torch thread: the shapes the accuracy benchmark trains. pytest-benchmark prints each group's
times with their ratio to the fastest; ``test_ratio_summary`` prints ALLoRA / LoRA medians from interleaved rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

N_IN, N_OUT, RANK, TOKENS = 576, 1536, 16, 512


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(N_IN, N_OUT, bias=False)

    def forward(self, x):
        return self.up(x)


def build(kind: str):
    """A one-layer peft model: ``lora`` (alpha=r, dropout 0, the same forward as ALLoRA) or ``allora`` (eta=2)."""
    from peft import LoraConfig, get_peft_model

    from allora_trl import apply_allora

    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=["up"]))
    with torch.no_grad():  # B != 0, as after the first steps: the coefficient is not constant
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if kind in ("allora", "allora_update"):
        apply_allora(model, eta=2.0)
    x = torch.randn(TOKENS, N_IN, requires_grad=True)  # input gradient needed, as inside a network
    grad = torch.randn(TOKENS, N_OUT)
    return model, x, grad


def fwd_bwd(model, x, grad):
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).backward(grad)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared CPU two threads wait on each other and the timings scatter by 5x or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _threads():
    assert torch.get_num_threads() == 1


def _save(benchmark, name: str, group: str, extra: dict | None = None) -> None:
    """Append this benchmark's median / IQR to ``$ALLORA_LAYER_SPEED_JSON`` (read by the benchmark report).

    pytest-benchmark's own ``--benchmark-json`` needs the optional ``py-cpuinfo`` package; this does not.
    """
    path = os.environ.get("ALLORA_LAYER_SPEED_JSON")
    if not path:
        return
    data = json.loads(Path(path).read_text()) if Path(path).is_file() else {"benchmarks": []}
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    entry = {
        "name": name,
        "group": group,
        "extra_info": extra or {},
        "stats": {"median": stats.median, "iqr": stats.iqr, "rounds": stats.rounds} if stats else {},
    }
    data["benchmarks"] = [b for b in data["benchmarks"] if b["name"] != name] + [entry]
    Path(path).write_text(json.dumps(data, indent=1))


FWD_BWD = "layer forward+backward (576->1536, r=16, 512 tokens)"
STEP = "layer training step with AdamW (576->1536, r=16, 512 tokens)"


@pytest.mark.benchmark(group=FWD_BWD)
@pytest.mark.parametrize("kind", ["lora", "allora"])
def test_layer_forward_backward(benchmark, kind):
    _threads()
    model, x, grad = build(kind)
    benchmark.pedantic(fwd_bwd, args=(model, x, grad), rounds=60, iterations=3, warmup_rounds=5)
    _save(benchmark, f"test_layer_forward_backward[{kind}]", FWD_BWD)


@pytest.mark.benchmark(group=STEP)
@pytest.mark.parametrize("kind", ["lora", "allora", "allora_update"])
def test_layer_training_step(benchmark, kind):
    from allora_trl.core.update_scaling import enable_update_scaling

    _threads()
    model, x, grad = build(kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if kind == "allora_update":
        enable_update_scaling(optimizer, model)

    def step():
        fwd_bwd(model, x, grad)
        optimizer.step()

    benchmark.pedantic(step, rounds=60, iterations=3, warmup_rounds=5)
    _save(benchmark, f"test_layer_training_step[{kind}]", STEP)


def test_ratio_summary(benchmark, capsys):
    """Interleaved rounds (LoRA, ALLoRA, LoRA, ALLoRA, ...): median ratio and IQR, printed for the report."""
    _threads()
    lora, allora = build("lora"), build("allora")
    for args in (lora, allora):
        for _ in range(5):
            fwd_bwd(*args)

    def timed(args, repeat=5):
        start = time.perf_counter()
        for _ in range(repeat):
            fwd_bwd(*args)
        return (time.perf_counter() - start) / repeat

    ratios = []
    for i in range(40):
        pair = (lora, allora) if i % 2 == 0 else (allora, lora)
        t = {id(a): timed(a) for a in pair}
        ratios.append(t[id(allora)] / t[id(lora)])
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    summary = {"allora_over_lora_median": med, "q1": q1, "q3": q3, "rounds": len(ratios)}
    benchmark.extra_info.update(summary)
    benchmark.pedantic(lambda: None, rounds=1)
    _save(benchmark, "test_ratio_summary", "ratio", summary)
    with capsys.disabled():
        print(f"\nALLoRA / LoRA layer forward+backward time: median {med:.3f} [IQR {q1:.3f}, {q3:.3f}] over 40 rounds")
