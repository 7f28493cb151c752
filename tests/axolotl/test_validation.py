"""``adapter: allora`` configs through Axolotl's real config loader and validator (``axolotl.cli.config.load_cfg``)."""

import math

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = pytest.mark.axolotl

from pydantic import ValidationError  # noqa: E402

from allora_trl.integrations.axolotl.plugin import resolve_settings  # noqa: E402


def test_defaults_filled(load_axolotl_cfg):
    cfg = load_axolotl_cfg()
    assert cfg.adapter == "allora"
    assert cfg.lora_alpha == cfg.lora_r == 8
    assert cfg.lora_dropout == 0.0
    assert not cfg.lora_mlp_kernel and not cfg.lora_qkv_kernel and not cfg.lora_o_kernel
    assert resolve_settings(cfg) == (2.0, "weight")


def test_explicit_settings_kept(load_axolotl_cfg):
    cfg = load_axolotl_cfg(
        lora_r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        allora_eta=0.5,
        allora_coefficient="output",
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
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit", "set only one"),
        (
            {"load_in_4bit": True, "model_kwargs": {"quantization_config": {"load_in_8bit": True}}},
            "model_kwargs.quantization_config",
            "bnb_config_kwargs",
        ),
        ({"rl": "grpo"}, "rl: grpo", "`adapter: lora` for `rl: grpo`"),
        ({"rl": "orpo"}, "rl: orpo", "`adapter: lora` for `rl: orpo`"),
        ({"rl": "simpo"}, "rl: simpo", "`simpo_gamma: 0.5`"),
        ({"allora_eat": 4}, "allora_eat", "did you mean `allora_eta`?"),  # was ignored: trained at eta 2
        ({"adapter": "lora", "allora_eat": 4}, "allora_eat", "did you mean `allora_eta`?"),
        ({"lora_mlp_kernel": True, "allora_coefficient": "output"}, "lora_mlp_kernel", "lora_mlp_kernel: false"),
    ],
)
def test_rejected_with_field_and_fix(load_axolotl_cfg, overrides, field, fix):
    with pytest.raises(ValidationError) as info:
        load_axolotl_cfg(**overrides)
    message = str(info.value)
    assert f"`{field}`" in message and fix in message


@pytest.mark.parametrize(
    "flags, compute_dtype", [({}, "float32"), ({"bf16": True}, "bfloat16"), ({"fp16": True}, "float16")]
)
def test_load_in_4bit_fills_axolotls_qlora_bitsandbytes_settings(load_axolotl_cfg, flags, compute_dtype):
    """The plugin hands `from_pretrained` the 4-bit settings Axolotl uses for `adapter: qlora`, computing in the run's
    dtype, with `bnb_config_kwargs` on top (as for qlora)."""
    cfg = load_axolotl_cfg(load_in_4bit=True, bnb_config_kwargs={"bnb_4bit_use_double_quant": False}, **flags)
    quantization = dict(cfg.overrides_of_model_kwargs.quantization_config)
    assert quantization["load_in_4bit"] is True and quantization["bnb_4bit_quant_type"] == "nf4"
    assert quantization["bnb_4bit_compute_dtype"] == compute_dtype == str(cfg.torch_dtype).removeprefix("torch.")
    assert quantization["bnb_4bit_use_double_quant"] is False  # from bnb_config_kwargs
    assert cfg.load_in_4bit is True and cfg.adapter == "allora"


def test_load_in_8bit_fills_model_kwargs_and_keeps_other_model_kwargs(load_axolotl_cfg):
    cfg = load_axolotl_cfg(load_in_8bit=True, model_kwargs={"low_cpu_mem_usage": True})
    assert dict(cfg.overrides_of_model_kwargs) == {
        "low_cpu_mem_usage": True,
        "quantization_config": {"load_in_8bit": True},
    }


@pytest.mark.parametrize("rl", ["dpo", "ipo", "kto"])
def test_supported_rl_modes_accepted(load_axolotl_cfg, rl):
    extra = {"remove_unused_columns": False} if rl == "kto" else {}
    cfg = load_axolotl_cfg(
        rl=rl, datasets=[{"path": "unused.jsonl", "ds_type": "json", "type": "chatml.default"}], **extra
    )
    assert cfg.rl == rl and cfg.adapter == "allora"


def test_relora_rejected_by_axolotl_capability(load_axolotl_cfg):
    """The plugin registers `allora` with relora=False, so Axolotl's own ReLoRA check refuses it."""
    with pytest.raises(ValidationError, match="ReLoRA"):
        load_axolotl_cfg(relora=True, jagged_restart_steps=10)
