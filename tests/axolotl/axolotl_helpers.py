"""Shared helpers of the Axolotl tests: paths, a small valid config, running ``axolotl train``, reading its output.

A plain module (imported by ``conftest.py`` and the test modules, as ``tests/distributed`` imports ``dist_common``)
because two ``conftest`` modules exist in this repository and ``from conftest import ...`` would be ambiguous.
Imports nothing from Axolotl.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "example_configs" / "axolotl" / "allora-smollm2.yaml"
EXAMPLE_DATA = REPO / "example_configs" / "axolotl" / "data" / "tiny.jsonl"
DPO_CONFIG = REPO / "example_configs" / "axolotl" / "allora-dpo.yaml"
PREFERENCE_DATA = REPO / "example_configs" / "axolotl" / "data" / "preferences.jsonl"
PLUGIN = "allora_trl.integrations.axolotl.ALLoRAPlugin"
PROBE_PLUGIN = "allora_probe_plugin.ProbePlugin"  # tests/axolotl/allora_probe_plugin.py, on the subprocess's PYTHONPATH


def axolotl_cli() -> str:
    """The ``axolotl`` console script of the running interpreter's environment."""
    found = Path(sys.executable).parent / "axolotl"
    return str(found) if found.exists() else (shutil.which("axolotl") or "axolotl")


def axolotl_env() -> dict:
    """Environment for an ``axolotl train`` subprocess: the venv's bin/ first on PATH (it starts
    ``accelerate launch``), no telemetry, no Hub, and this folder on PYTHONPATH for the probe plugin."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def base_config(model_dir: str, tmp_path, **overrides) -> dict:
    """A small valid ``adapter: allora`` Axolotl config on ``model_dir``, writing only under ``tmp_path``."""
    cfg = {
        "base_model": str(model_dir),
        "plugins": [PLUGIN],
        "adapter": "allora",
        "lora_r": 8,
        "lora_target_linear": True,
        "datasets": [{"path": str(EXAMPLE_DATA), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "val_set_size": 0,
        "sequence_len": 64,
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def run_axolotl_train(cfg: dict, tmp_path, timeout: int = 600) -> str:
    """Write ``cfg`` to a YAML file and run ``axolotl train`` on it (as a user would); return its output.

    Fails the test, with the end of the output, when the run fails.
    """
    import yaml  # the job extra's dependency, not the library's: imported only where a run is written

    config_file = tmp_path / "axolotl.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        [axolotl_cli(), "train", str(config_file)],
        cwd=tmp_path,
        env=axolotl_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    return output


def allora_log_history(checkpoint) -> list[dict]:
    """The log lines of ``trainer_state.json`` in ``checkpoint`` that carry ALLoRA's statistics."""
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "allora/coefficient_mean" in h]


def assert_plain_lora_adapter(folder, r: int) -> dict:
    """``folder`` holds a plain LoRA adapter at scaling 1 (what any LoRA loader reads) and ALLoRA's settings."""
    adapter = json.loads((Path(folder) / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert adapter["lora_alpha"] == adapter["r"] == r
    assert adapter["lora_dropout"] == 0.0 and not adapter["use_dora"] and not adapter["use_rslora"]
    assert (Path(folder) / "adapter_model.safetensors").is_file()
    return json.loads((Path(folder) / "allora_config.json").read_text())
