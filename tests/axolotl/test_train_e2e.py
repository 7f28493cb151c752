"""End to end: ``axolotl train`` (which runs ``accelerate launch -m axolotl.cli.train``) on the SFT example config.

Uses SmolLM2-135M-Instruct from ``allora_trl.job.assets.smollm2_path()`` when it can be had offline, else the tiny
random Llama of the shared fixtures; 3 steps of 64 tokens on CPU either way. Axolotl's SFT trainer keeps its own
metric store (``store_metrics``), so this also checks that the shared ALLoRA callback's statistics reach its logs.
"""

import warnings

import pytest
import yaml

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

from axolotl_helpers import allora_log_history, assert_plain_lora_adapter, run_axolotl_train  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from allora_trl.core.model import iter_lora_layers  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def base_model(request) -> str:
    """SmolLM2 if its package (or the converted cache) is available, else the tiny random Llama."""
    try:
        from allora_trl.job.assets import smollm2_path

        return smollm2_path()
    except (ImportError, FileNotFoundError) as exc:
        warnings.warn(
            f"SmolLM2 unavailable ({exc}); the Axolotl end-to-end test uses the tiny random Llama.", stacklevel=2
        )
        return request.getfixturevalue("tiny_model_dir")


def test_axolotl_train_example_config(base_model, axolotl_cmd, tmp_path):
    cfg = yaml.safe_load(axolotl_cmd["config"].read_text())
    assert cfg["adapter"] == "allora" and "allora_trl.integrations.axolotl.ALLoRAPlugin" in cfg["plugins"]
    cfg.update(
        base_model=base_model,
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
        max_steps=STEPS,
        save_steps=STEPS,
        logging_steps=1,
    )
    cfg["datasets"][0]["path"] = str(axolotl_cmd["data"])
    output = run_axolotl_train(cfg, tmp_path)
    assert "ALLoRA installed on" in output

    out = tmp_path / "out"
    # a plain LoRA adapter with allora_config.json beside it, also in the checkpoint
    for folder in (out, out / f"checkpoint-{STEPS}"):
        settings = assert_plain_lora_adapter(folder, cfg["lora_r"])
        assert (settings["eta"], settings["coefficient"]) == (cfg["allora_eta"], cfg["allora_coefficient"])

    # ALLoRA was active: its coefficient statistics were logged at every step; c = eta while B == 0 (step 1),
    # then falls below eta as ||BA|| grows.
    stats = allora_log_history(out / f"checkpoint-{STEPS}")
    assert [h["step"] for h in stats] == list(range(1, STEPS + 1))
    eta = cfg["allora_eta"]
    assert stats[0]["allora/coefficient_max"] == pytest.approx(eta, rel=1e-4)
    assert all(h["allora/coefficient_max"] <= eta + 1e-4 for h in stats)
    assert stats[-1]["allora/coefficient_min"] < eta and stats[-1]["allora/row_norm_mean"] > 0

    # the saved adapter loads with plain peft, at scaling 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(out))
    scalings = {s for _, layer in iter_lora_layers(model) for s in layer.scaling.values()}
    assert scalings == {1.0}
