"""``adapter: allora`` configs through Axolotl's real config loader and validator (``axolotl.cli.config.load_cfg``)."""

import math

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = pytest.mark.axolotl

from allora_trl.integrations.axolotl.plugin import resolve_settings  # noqa: E402
from pydantic import ValidationError  # noqa: E402


def test_defaults_filled(load_axolotl_cfg):
    cfg = load_axolotl_cfg()
    assert cfg.adapter == "allora"
    assert cfg.lora_alpha == cfg.lora_r == 8
    assert cfg.lora_dropout == 0.0
    assert not cfg.lora_mlp_kernel and not cfg.lora_qkv_kernel and not cfg.lora_o_kernel
    assert resolve_settings(cfg) == (2.0, "weight")


def test_explicit_settings_kept(load_axolotl_cfg):
    cfg = load_axolotl_cfg(
        lora_r=4, lora_alpha=4, lora_dropout=0.0, allora_eta=0.5, allora_coefficient="output",
        lora_rank_pattern={"q_proj": 2},
    )
    assert (cfg.allora_eta, cfg.allora_coefficient) == (0.5, "output")
    assert resolve_settings(cfg) == (0.5, "output")
    assert dict(cfg.lora_alpha_pattern) == {"q_proj": 2}


def test_other_adapter_unchanged_by_plugin(load_axolotl_cfg):
    """With `adapter: lora` the validated config is the same whether or not the plugin is listed."""
    lora = {"adapter": "lora", "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "peft_use_rslora": True}
    with_plugin = load_axolotl_cfg(**lora)
    without_plugin = load_axolotl_cfg(plugins=None, **lora)
    ignore = {"plugins", "axolotl_config_path"}
    assert {k: v for k, v in with_plugin.items() if k not in ignore} == {
        k: v for k, v in without_plugin.items() if k not in ignore
    }
    assert with_plugin.lora_alpha == 32 and with_plugin.lora_dropout == 0.05


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        ({"lora_alpha": 16}, "lora_alpha", "lora_alpha: 8"),
        ({"lora_dropout": 0.1}, "lora_dropout", "lora_dropout: 0"),
        ({"peft_use_dora": True}, "peft_use_dora", "Remove `peft_use_dora`"),
        ({"peft_use_rslora": True}, "peft_use_rslora", "Remove `peft_use_rslora`"),
        ({"allora_eta": 0.0}, "allora_eta", "positive finite"),
        ({"allora_eta": -2.0}, "allora_eta", "positive finite"),
        ({"allora_eta": math.inf}, "allora_eta", "positive finite"),
        ({"allora_eta": math.nan}, "allora_eta", "positive finite"),
        ({"allora_coefficient": "rows"}, "allora_coefficient", "'weight', 'output'"),
        ({"load_in_4bit": True}, "load_in_4bit", "Remove `load_in_4bit`"),
        ({"load_in_8bit": True}, "load_in_8bit", "Remove `load_in_8bit`"),
        ({"lora_mlp_kernel": True}, "lora_mlp_kernel", "lora_mlp_kernel: false"),
    ],
)
def test_rejected_with_field_and_fix(load_axolotl_cfg, overrides, field, fix):
    with pytest.raises(ValidationError) as info:
        load_axolotl_cfg(**overrides)
    message = str(info.value)
    assert f"`{field}`" in message and fix in message


def test_relora_rejected_by_axolotl_capability(load_axolotl_cfg):
    """The plugin registers `allora` with relora=False, so Axolotl's own ReLoRA check refuses it."""
    with pytest.raises(ValidationError, match="ReLoRA"):
        load_axolotl_cfg(relora=True, jagged_restart_steps=10)
