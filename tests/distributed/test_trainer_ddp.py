"""``accelerate launch`` of the real command, 2 processes (DDP over gloo), equals one process with the same global batch.

The user's command, unchanged except for what a machine without GPUs needs:

    accelerate launch --config_file example_configs/accelerate/ddp.yaml --num_processes 2 --mixed_precision no \\
        -m allora_trl.cli train --config job.yaml --per_device_train_batch_size 4

against ``python -m allora_trl.cli train --config job.yaml --per_device_train_batch_size 8`` (global batch 8 in
both). ``use_cpu: true`` in job.yaml is the CPU workaround: accelerate only forms a multi-CPU (gloo) DDP group when
the Accelerator is created with ``cpu=True``; without it each process would silently train alone (the check in
``allora_trl.core.distributed`` turns that into an error). ``--mixed_precision no`` keeps fp32 (the shipped config asks
for bf16, which CPUs would honour in autocast).

Compared: the final adapters after 4 SGD steps (atol 1e-5), the logged losses and ALLoRA coefficient statistics at
every step, and the checkpoint written under DDP (a plain LoRA adapter plus ``allora_config.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_launch import accelerate_launch, run_checked
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
DDP_CONFIG = REPO / "example_configs" / "accelerate" / "ddp.yaml"
STATS = ("allora/coefficient_min", "allora/coefficient_mean", "allora/coefficient_max", "allora/row_norm_mean")


def job_config(tmp_path: Path, model_dir: str) -> Path:
    """A tiny job: constant learning rate (no warm-up step at lr 0), a checkpoint at step 2, no evaluation.

    SGD, so that a difference in gradients shows up in the weights in proportion. (AdamW's first updates are about
    lr * g / (|g| + eps): for the odd element whose gradient is near eps it turns reduction-order noise of 1e-9 into
    a visible update difference, which says nothing about DDP; DDP only averages gradients, and the optimizer then
    runs identically in every process. AdamW is covered by test_fsdp2.py.)
    """
    colours, things = ["red", "green", "blue", "yellow"], ["apple", "grass", "sky", "banana"]
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Question: What colour is the {things[i % 4]}?\nAnswer:",
                    "completion": f" {colours[i % 4]}",
                }
            )
            + "\n"
            for i in range(64)
        )
    )
    config = tmp_path / "job.yaml"
    config.write_text(
        "\n".join(
            [
                f"model_name_or_path: {model_dir}",
                f"dataset_path: {data}",
                "skip_eval: true",
                "lora_r: 4",
                "max_steps: 4",
                "optim: sgd",
                "learning_rate: 0.5",
                "lr_scheduler_type: constant",
                "warmup_steps: 0",
                "logging_steps: 1",
                "save_strategy: steps",
                "save_steps: 2",
                "report_to: none",
                "seed: 0",
                "max_length: 32",
                "dataloader_num_workers: 0",
                "use_cpu: true",
            ]
        )
        + "\n"
    )
    return config


def logged(run: Path) -> list[dict]:
    history = json.loads((run / "summary.json").read_text())["log_history"]
    return [{k: entry[k] for k in ("loss", *STATS)} for entry in history if "loss" in entry]


@pytest.mark.slow
def test_accelerate_ddp_matches_single_process(tmp_path, tiny_model_dir):
    config = job_config(tmp_path, tiny_model_dir)
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    train = ["-m", "allora_trl.cli", "train", "--config", str(config)]  # the same job, one process or two
    run_checked([sys.executable, *train, "--output_dir", str(one), "--per_device_train_batch_size", "8"])
    accelerate_launch(
        *("--config_file", str(DDP_CONFIG), "--num_processes", "2", "--mixed_precision", "no"),
        *train,
        *("--output_dir", str(ddp), "--per_device_train_batch_size", "4"),
    )

    expected, actual = load_file(one / "adapter_model.safetensors"), load_file(ddp / "adapter_model.safetensors")
    assert sorted(actual) == sorted(expected) and len(expected) == 28  # 7 linear layers x 2 layers x (A, B)
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-2  # B moved from 0 (~0.16)
    worst = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    print(f"max |adapter difference| DDP x2 vs one process: {worst:.2e}")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)

    # Same losses and the same coefficients, step by step; and the DDP run really ran as 2 ranks of one group
    # (a process training alone would log half the tokens).
    one_log, ddp_log = logged(one), logged(ddp)
    assert len(one_log) == len(ddp_log) == 4
    for a, b in zip(ddp_log, one_log):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert ddp_log[-1]["allora/coefficient_min"] < 1.9  # B has moved: the coefficients are well below eta
    tokens = [json.loads((run / "summary.json").read_text())["log_history"][0]["num_tokens"] for run in (one, ddp)]
    assert tokens[0] == tokens[1]

    # The checkpoint saved under DDP is the same plain LoRA adapter + allora_config.json as in one process.
    for name in ("adapter_config.json", "allora_config.json", "adapter_model.safetensors"):
        assert (ddp / "checkpoint-2" / name).is_file(), name
    assert json.loads((ddp / "checkpoint-2" / "allora_config.json").read_text())["eta"] == 2.0
    mid_one, mid_ddp = (load_file(run / "checkpoint-2" / "adapter_model.safetensors") for run in (one, ddp))
    for key in mid_one:
        torch.testing.assert_close(mid_ddp[key], mid_one[key], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_accelerate_ddp_evaluates_in_every_process(tmp_path, tiny_model_dir):
    """With evaluation on, every process evaluates (a sharded model, FSDP2 or ZeRO-3, runs a forward only with all
    its processes: one evaluating alone would wait for the others for ever); the main one alone writes the results,
    and every process leaves the process group before exiting."""
    config = job_config(tmp_path, tiny_model_dir)
    output = accelerate_launch(
        *("--config_file", str(DDP_CONFIG), "--num_processes", "2", "--mixed_precision", "no"),
        *("-m", "allora_trl.cli", "train", "--config", str(config), "--output_dir", str(tmp_path / "ddp")),
        *("--skip_eval", "false", "--eval_tasks", "arc_easy", "--eval_limit", "4", "--eval_batch_size", "4"),
        *("--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "4"),
    )
    assert output.count("Accuracy before training") == 2 and output.count("Accuracy after training") == 2
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["accuracy_after"]["arc_easy"]["n"] == 4
    assert summary["answer_loss_change"]["arc_easy"]["n"] == 4
