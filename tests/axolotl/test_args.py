"""The plugin's pydantic config model on its own: importable and correct without Axolotl installed.

Not marked ``axolotl``: this runs in the main suite too, and guards that the args model needs no Axolotl.
"""

import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from allora_trl.integrations.axolotl.args import ALLoRAArgs, check_allora_config


def test_args_import_without_axolotl_and_plugin_is_lazy():
    """`import allora_trl` and the config model import no Axolotl module, even where Axolotl is installed."""
    code = (
        "import sys, allora_trl, allora_trl.integrations.axolotl as m; "
        "assert m.ALLoRAArgs is not None and 'ALLoRAPlugin' in m.__all__; "
        "print(sorted(n for n in sys.modules if n == 'axolotl' or n.startswith('axolotl.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_fills_alpha_dropout_patterns_and_kernels():
    data = check_allora_config({"adapter": "allora", "lora_r": 16, "lora_rank_pattern": {"q_proj": 4}})
    assert data["lora_alpha"] == 16
    assert data["lora_dropout"] == 0.0
    assert data["lora_alpha_pattern"] == {"q_proj": 4}
    assert data["lora_mlp_kernel"] is False and data["lora_qkv_kernel"] is False and data["lora_o_kernel"] is False


def test_other_adapters_are_untouched():
    data = {"adapter": "lora", "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "peft_use_dora": True}
    assert check_allora_config(data) == data
    assert check_allora_config({"adapter": None}) == {"adapter": None}


def test_allora_settings_with_other_adapter_warn(caplog):
    with caplog.at_level("WARNING"):
        ALLoRAArgs.model_validate({"adapter": "lora", "lora_r": 8, "allora_eta": 1.0})
    assert "ignored" in caplog.text and "allora_eta" in caplog.text


def test_explicit_matching_values_accepted():
    args = ALLoRAArgs.model_validate(
        {
            "adapter": "allora",
            "lora_r": 4,
            "lora_alpha": 4,
            "lora_dropout": 0,
            "allora_eta": "0.5",
            "allora_coefficient": "output",
        }
    )
    assert args.allora_eta == 0.5 and args.allora_coefficient == "output"
    assert ALLoRAArgs.model_validate({"adapter": "allora", "lora_r": 4}).allora_eta is None  # default resolved later


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"lora_alpha": 32}, "lora_alpha"),
        ({"lora_dropout": 0.05}, "lora_dropout"),
        ({"peft_use_dora": True}, "peft_use_dora"),
        ({"peft_use_rslora": True}, "peft_use_rslora"),
        ({"gptq": True}, "gptq"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit"),
        ({"load_in_4bit": True, "fsdp_config": {"fsdp_version": 2}}, "load_in_4bit"),
        (
            {"load_in_8bit": True, "model_kwargs": {"quantization_config": {"load_in_4bit": True}}},
            "model_kwargs.quantization_config",
        ),
        ({"rl": "grpo"}, "rl: grpo"),
        ({"rl": "gdpo"}, "rl: gdpo"),
        ({"rl": "ebft"}, "rl: ebft"),
        ({"rl": "orpo"}, "rl: orpo"),
        ({"lora_qkv_kernel": True, "allora_coefficient": "output"}, "lora_qkv_kernel"),
        ({"lora_target_parameters": ["experts.gate_up_proj"]}, "lora_target_parameters"),
        ({"lora_rank_pattern": {"q_proj": 4}, "lora_alpha_pattern": {"q_proj": 8}}, "lora_alpha_pattern"),
        ({"lora_r": None}, "lora_r"),
        ({"allora_eta": 0}, "allora_eta"),
        ({"allora_eta": -1.0}, "allora_eta"),
        ({"allora_eta": math.inf}, "allora_eta"),
        ({"allora_eta": math.nan}, "allora_eta"),
        ({"allora_eta": "big"}, "allora_eta"),
        ({"allora_eta": True}, "allora_eta"),
        ({"allora_coefficient": "row"}, "allora_coefficient"),
        ({"allora_scale": "update"}, "allora_scale: update"),
    ],
)
def test_rejections_name_the_field(overrides, field):
    data = {"adapter": "allora", "lora_r": 8, **overrides}
    with pytest.raises(ValidationError) as info:
        ALLoRAArgs.model_validate(data)
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize("version, accepted", [("0.19.0", True), ("0.19.2", True), ("0.20.0", False), (None, False)])
def test_fused_kernels_need_axolotl_019(monkeypatch, version, accepted):
    """ALLoRA's versions of Axolotl's fused LoRA kernels are written for Axolotl 0.19's kernel API: other versions
    (and no Axolotl) are refused naming the version and the fix."""
    from allora_trl.integrations.axolotl import args

    monkeypatch.setattr(args, "_axolotl_version", lambda: version)
    data = {"adapter": "allora", "lora_r": 8, "lora_qkv_kernel": True, "lora_o_kernel": True}
    if accepted:
        filled = check_allora_config(data)
        assert filled["lora_qkv_kernel"] and filled["lora_o_kernel"] and filled["lora_mlp_kernel"] is False
    else:
        with pytest.raises(ValueError) as info:
            check_allora_config(data)
        message = str(info.value)
        assert (version or "no Axolotl installation") in message
        assert "`lora_qkv_kernel: false` and `lora_o_kernel: false`" in message


def test_load_in_4bit_fills_the_bitsandbytes_config_for_from_pretrained():
    """Axolotl's loader passes `model_kwargs` to `from_pretrained` for every adapter name: the 4-bit settings go there."""
    data = check_allora_config(
        {
            "adapter": "allora",
            "lora_r": 8,
            "load_in_4bit": True,
            "bf16": True,
            "model_kwargs": {"low_cpu_mem_usage": True},
        }
    )
    assert data["model_kwargs"]["low_cpu_mem_usage"] is True
    quantization = data["model_kwargs"]["quantization_config"]
    assert quantization["load_in_4bit"] is True and quantization["bnb_4bit_quant_type"] == "nf4"
    assert quantization["bnb_4bit_compute_dtype"] == "bfloat16"
    assert data["load_in_4bit"] is True  # kept: Axolotl's own 4-bit handling (dtype casts) still sees it


def test_quantisation_fill_is_idempotent():
    """A config validated twice (Axolotl re-validates in some paths) must not be rejected for its own filled value."""
    once = check_allora_config({"adapter": "allora", "lora_r": 8, "load_in_8bit": True})
    assert once["model_kwargs"] == {"quantization_config": {"load_in_8bit": True}}
    assert check_allora_config(once) == once


def test_rl_modes():
    for rl in ("dpo", "ipo", "kto", "simpo"):
        assert check_allora_config({"adapter": "allora", "lora_r": 8, "rl": rl, "simpo_gamma": 0.5})["rl"] == rl
    with pytest.raises(ValueError, match="`simpo_gamma`"):  # else TRL's CPO trainer fails at its first step
        check_allora_config({"adapter": "allora", "lora_r": 8, "rl": "simpo"})
    with pytest.raises(ValueError, match=r"`rl: grpo`.*`adapter: lora` for `rl: grpo`"):
        check_allora_config({"adapter": "allora", "lora_r": 8, "rl": "grpo"})


def test_all_problems_reported_at_once():
    with pytest.raises(ValidationError) as info:
        ALLoRAArgs.model_validate({"adapter": "allora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1})
    message = str(info.value)
    assert "`lora_alpha`" in message and "`lora_dropout`" in message


def test_an_adapter_trained_with_update_scaling_is_not_continued_silently(tmp_path):
    """allora_scale="update" (saved by the TRL trainers) cannot take effect in Axolotl: refused, naming the file."""
    from allora_trl.core.settings import ALLoRASettings, save_allora_config

    save_allora_config(ALLoRASettings(scale="update"), tmp_path)
    with pytest.raises(ValidationError) as info:
        ALLoRAArgs.model_validate({"adapter": "allora", "lora_r": 8, "lora_model_dir": str(tmp_path)})
    assert "`lora_model_dir`" in str(info.value) and "allora_scale='update'" in str(info.value)
    save_allora_config(ALLoRASettings(), tmp_path)  # the paper's rule continues as before
    ALLoRAArgs.model_validate({"adapter": "allora", "lora_r": 8, "lora_model_dir": str(tmp_path)})
    (tmp_path / "allora_config.json").write_text("{not json")
    with pytest.raises(ValidationError, match="lora_model_dir"):
        ALLoRAArgs.model_validate({"adapter": "allora", "lora_r": 8, "lora_model_dir": str(tmp_path)})


@pytest.mark.parametrize("adapter", ["allora", "lora"])
def test_a_misspelt_allora_key_is_an_error_naming_the_nearest(adapter):
    """`allora_eat: 4` used to be ignored, training at eta 2."""
    with pytest.raises(ValidationError, match=r"`allora_eat`.*did you mean `allora_eta`") as info:
        ALLoRAArgs.model_validate({"adapter": adapter, "lora_r": 4, "allora_eat": 4})
    assert "\n" not in str(info.value.errors()[0]["msg"])
    with pytest.raises(ValidationError, match=r"`allora_zzz`.*allora_eta, allora_coefficient"):
        ALLoRAArgs.model_validate({"adapter": adapter, "lora_r": 4, "allora_zzz": 1})
