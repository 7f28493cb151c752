"""Helpers for the Axolotl tests.

Tests marked ``axolotl`` need the separate Axolotl virtual environment (``.ci/axolotl.sh``). Each such module calls
``pytest.importorskip("axolotl.integrations.base")``, so the main suite skips them with a reason; a submodule,
because where Axolotl is missing this folder itself imports as a namespace package ``axolotl``. Axolotl is
imported lazily here.
"""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # telemetry uploads cannot leave these machines; retries are slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "example_configs" / "axolotl" / "allora-smollm2.yaml"
EXAMPLE_DATA = REPO / "example_configs" / "axolotl" / "data" / "tiny.jsonl"
PLUGIN = "allora_trl.integrations.axolotl.ALLoRAPlugin"


def axolotl_cli() -> str:
    """The ``axolotl`` console script of the running interpreter's environment."""
    found = Path(sys.executable).parent / "axolotl"
    return str(found) if found.exists() else (shutil.which("axolotl") or "axolotl")


def axolotl_env() -> dict:
    """Environment for an ``axolotl train`` subprocess: the venv's bin/ first on PATH (it starts
    ``accelerate launch``), no telemetry, no Hub."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
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


@pytest.fixture()
def axolotl_cmd():
    """What the end-to-end test needs from here: the ``axolotl`` script, its environment, the example files."""
    return {"cli": axolotl_cli(), "env": axolotl_env(), "config": EXAMPLE_CONFIG, "data": EXAMPLE_DATA}


@pytest.fixture()
def load_axolotl_cfg(tiny_model_dir, tmp_path):
    """Validate a config through Axolotl's own CLI loader (``axolotl.cli.config.load_cfg``: plugin registration,
    the merged pydantic config model, then ``normalize_config``); keyword arguments override :func:`base_config`."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    def load(**overrides):
        return load_cfg(DictDefault(base_config(tiny_model_dir, tmp_path, **overrides)))

    return load
