"""ALLoRA under torch FSDP2 (``fully_shard`` per decoder layer, then root) and DDP equals one-process training.

Two CPU processes (gloo), started by ``torchrun``, each train on half of every fixed global batch; one process
(this pytest process) trains on the whole batch. Compared:

* the coefficient statistics each ALLoRA layer recorded in its own forward (min/max/sum per layer, per
  step): they match, and all ranks recorded the same ones, so every layer saw its full, all-gathered A and B;
* the first step's full gradients (atol 1e-6) and the LoRA weights after 4 AdamW steps (atol 1e-5, fp32; the
  observed difference is 6.2e-7: reduction order only);
* the adapter exported from the sharded model (full state dict gathered to rank 0, loaded into an unsharded
  copy, ``save_pretrained``) against the one saved by the single process: same files, same tensors;
* a run stopped at step 2, saved as a sharded torch.distributed.checkpoint and resumed in fresh processes, against
  the unbroken run.

A control shows the tolerance is meaningful: plain LoRA from the same start ends 5e-2 away from ALLoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_common import build_model, global_batch, lora_state, loss_on, make_optimizer
from dist_launch import torchrun
from safetensors.torch import load_file

from allora_trl import collect_allora_stats, save_allora_adapter, set_allora_stats_recording
from allora_trl.core.model import allora_variants

STEPS = 4
OPTIMIZER = "adamw"
WEIGHT_ATOL = 1e-5
GRAD_ATOL = 1e-6


def single_process(steps: int, out: Path | None = None, allora: bool = True, qlora_dir: str | None = None) -> dict:
    """The reference: the same model and steps on the whole global batch in this one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(qlora_dir=qlora_dir)
        if not allora:  # the control: plain LoRA (scaling 1, no dropout) from the same weights
            for layer_variants in (m.lora_variant for m in model.modules() if hasattr(m, "lora_variant")):
                layer_variants.clear()
        optimizer = make_optimizer(model, OPTIMIZER)
        record = {"layer_stats": [], "stats": [], "grads": None}
        for step in range(steps):
            set_allora_stats_recording(model, True)
            loss_on(model, global_batch(step)).backward()
            record["stats"].append(collect_allora_stats(model))
            record["layer_stats"].append(
                [
                    [v.stats.values[k].item() for k in ("coefficient_min", "coefficient_max", "coefficient_sum")]
                    for v in allora_variants(model)
                ]
            )
            if step == 0:
                record["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            optimizer.zero_grad()
        record["lora"] = lora_state(model.named_parameters())
        if out is not None:
            save_allora_adapter(model, out)
        return record
    finally:
        torch.set_num_threads(threads)


def assert_tensors_close(actual: dict, expected: dict, atol: float) -> float:
    """Same keys, every tensor within ``atol``; returns the largest absolute difference."""
    assert sorted(actual) == sorted(expected)
    worst = 0.0
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        worst = max(worst, (actual[key] - value).abs().max().item())
    return worst


def read_config(path: Path) -> dict:
    """A saved config, with ``target_modules`` as a set: peft writes that set in per-process hash order."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = set(config["target_modules"])
    return config


def assert_same_adapter(actual_dir: Path, expected_dir: Path) -> None:
    for name in ("adapter_config.json", "allora_config.json"):
        assert read_config(actual_dir / name) == read_config(expected_dir / name), name
    assert_tensors_close(
        load_file(actual_dir / "adapter_model.safetensors"),
        load_file(expected_dir / "adapter_model.safetensors"),
        WEIGHT_ATOL,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("single") / "adapter"
    return single_process(STEPS, out), out


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun("torch_worker.py", "--mode", "fsdp2", "--optimizer", OPTIMIZER, "--steps", str(STEPS), "--out", str(out))
    return out


def check_against_reference(result: dict, reference: dict) -> None:
    assert result["ranks_agree"], "ranks used different ALLoRA coefficients"
    for got, want in zip(result["layer_stats"], reference["layer_stats"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert_tensors_close(result["grads"], reference["grads"], GRAD_ATOL)
    worst = assert_tensors_close(result["lora"], reference["lora"], WEIGHT_ATOL)
    print(f"max |LoRA weight difference| vs one process: {worst:.2e}")


def test_fsdp2_matches_single_process(fsdp2_run, reference):
    expected, expected_adapter = reference
    result = torch.load(fsdp2_run / "result.pt")
    check_against_reference(result, expected)
    assert_same_adapter(fsdp2_run / "adapter", expected_adapter)
    # Sharded weights are whole only inside their layer's forward: each layer refreshes its coefficient there,
    # once per optimizer step (FSDP2 gathers again for backward without a second refresh).
    cache = result["cache"]
    assert cache["sharded"] and cache["refreshes"] == cache["steps"] * cache["layers"], cache


def test_ddp_matches_single_process(tmp_path, reference):
    torchrun(
        "torch_worker.py", "--mode", "ddp", "--optimizer", OPTIMIZER, "--steps", str(STEPS), "--out", str(tmp_path)
    )
    expected, expected_adapter = reference
    result = torch.load(tmp_path / "result.pt")
    check_against_reference(result, expected)
    assert_same_adapter(tmp_path / "adapter", expected_adapter)
    # Whole weights: one batched refresh per optimizer step for all layers of one shape, at most one per layer.
    cache = result["cache"]
    assert not cache["sharded"] and cache["steps"] <= cache["refreshes"] < cache["steps"] * cache["layers"], cache


def test_fsdp2_sharded_checkpoint_resumes_to_the_same_weights(tmp_path, fsdp2_run, reference):
    ckpt = tmp_path / "ckpt"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    half = str(STEPS // 2)
    common = ["--mode", "fsdp2", "--optimizer", OPTIMIZER]
    torchrun("torch_worker.py", *common, "--steps", half, "--save-checkpoint", str(ckpt), "--out", str(first))
    torchrun(
        "torch_worker.py",
        *common,
        "--first-step",
        half,
        "--steps",
        str(STEPS),
        "--resume",
        str(ckpt),
        "--out",
        str(second),
    )
    resumed = torch.load(second / "result.pt")
    unbroken = torch.load(fsdp2_run / "result.pt")
    # Same sharded computation on both sides: the resumed run must reproduce the unbroken one to rounding.
    assert_tensors_close(resumed["lora"], unbroken["lora"], 1e-6)
    assert_tensors_close(resumed["lora"], reference[0]["lora"], WEIGHT_ATOL)
    assert_same_adapter(second / "adapter", reference[1])


def test_tolerance_is_meaningful(reference):
    """Plain LoRA from the same weights ends far outside the tolerance: the comparison does test the rule."""
    plain = single_process(STEPS, allora=False)
    gap = max((plain["lora"][k] - reference[0]["lora"][k]).abs().max().item() for k in plain["lora"])
    assert gap > 100 * WEIGHT_ATOL, gap
