"""apply_allora on real peft models: layers, config, merge, save/reload, and the errors it must raise."""

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from allora_trl import ALLORA_CONFIG_NAME, allora_settings, apply_allora, load_allora_adapter, save_allora_adapter
from allora_trl.core.variant import ALLoRALinearVariant


def peft_model(model_dir, **lora_kwargs):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    config.update(lora_kwargs)
    return get_peft_model(base, LoraConfig(**config))


def randomise_B(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1


def test_apply_sets_scaling_dropout_variant_and_config(tiny_model_dir):
    model = peft_model(tiny_model_dir, rank_pattern={"q_proj": 8}, alpha_pattern={"k_proj": 3})
    apply_allora(model, eta=1.5)
    layers = [m for m in model.modules() if hasattr(m, "lora_variant") and "default" in m.lora_A]
    assert layers
    for layer in layers:
        assert layer.scaling["default"] == 1.0
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
        assert isinstance(layer.lora_variant["default"], ALLoRALinearVariant)
        assert layer.lora_variant["default"].eta == 1.5
    config = model.peft_config["default"]
    assert config.lora_alpha == config.r == 4
    assert config.alpha_pattern == config.rank_pattern == {"q_proj": 8}
    assert config.lora_dropout == 0.0
    assert allora_settings(model).eta == 1.5


def test_forward_equals_vanilla_lora_at_scaling_one(tiny_model_dir):
    model = peft_model(tiny_model_dir, lora_alpha=4, lora_dropout=0.0)
    randomise_B(model)
    model.eval()
    ids = torch.randint(0, 100, (2, 9))
    vanilla = model(ids).logits
    apply_allora(model)
    torch.testing.assert_close(model(ids).logits, vanilla)


def test_merge_and_unmerge_equal_vanilla_lora(tiny_model_dir):
    model = apply_allora(peft_model(tiny_model_dir))
    randomise_B(model)
    model.eval()
    ids = torch.randint(0, 100, (2, 9))
    unmerged = model(ids).logits
    for safe in (False, True):
        model.merge_adapter(safe_merge=safe)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_saved_adapter_is_plain_lora_and_reloads_identically(tiny_model_dir, tmp_path):
    model = apply_allora(peft_model(tiny_model_dir), eta=3.0, coefficient="output")
    randomise_B(model)
    model.eval()
    ids = torch.randint(0, 100, (2, 9))
    expected = model(ids).logits
    save_allora_adapter(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["lora_alpha"] == config["r"] == 4
    assert config["lora_dropout"] == 0.0
    assert not any("allora" in key.lower() for key in config)
    assert set(config) <= set(LoraConfig().to_dict()) | {
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "peft_version",
    }
    assert json.loads((tmp_path / ALLORA_CONFIG_NAME).read_text())["eta"] == 3.0

    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).eval()
    assert not any(m.lora_variant for m in vanilla.modules() if hasattr(m, "lora_variant"))
    torch.testing.assert_close(vanilla(ids).logits, expected)

    reloaded = load_allora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).eval()
    assert allora_settings(reloaded).eta == 3.0 and allora_settings(reloaded).coefficient == "output"
    torch.testing.assert_close(reloaded(ids).logits, expected)


def test_model_gradients_follow_the_rule(tiny_model_dir):
    """Inside a real model the B gradient equals c * vanilla B gradient, row by row (scaling 1 for both)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 9))
    grads = {}
    for use_allora in (False, True):
        torch.manual_seed(1)  # the same A initialisation in both models
        model = peft_model(tiny_model_dir, lora_alpha=4, lora_dropout=0.0)
        randomise_B(model)
        if use_allora:
            apply_allora(model, eta=2.0)
        model(ids, labels=ids).loss.backward()
        layer = model.base_model.model.model.layers[1].self_attn.q_proj
        grads[use_allora] = (layer.lora_B["default"].weight.grad.clone(), layer)
    from allora_trl import weight_coefficient

    layer = grads[True][1]
    c = weight_coefficient(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
    # The forward passes are identical and input gradients are not scaled, so every layer sees the same G:
    # ALLoRA's B gradient is exactly c_i times vanilla LoRA's, row by row.
    torch.testing.assert_close(grads[True][0], grads[False][0] * c[:, None], rtol=1e-4, atol=1e-7)


def test_no_lora_layers_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="peft model"):
        apply_allora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"use_dora": True}, "DoRA"), ({"use_rslora": True}, "rsLoRA"), ({"lora_bias": True}, "lora_bias")],
)
def test_dora_rslora_bias_are_errors(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_allora(peft_model(tiny_model_dir, **kwargs))


def test_embedding_lora_is_an_error_naming_the_type(tiny_model_dir):
    model = peft_model(tiny_model_dir, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="Embedding"):
        apply_allora(model)


@pytest.mark.parametrize("eta", [0, -1, float("inf"), float("nan"), "x"])
def test_bad_eta_is_an_error(tiny_model_dir, eta):
    with pytest.raises(ValueError, match="eta"):
        apply_allora(peft_model(tiny_model_dir), eta=eta)


def test_bad_coefficient_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="coefficient.*'weight'"):
        apply_allora(peft_model(tiny_model_dir), coefficient="rows")


# ----- allora_config.json: every setting, a format version, old files, bad files ------------------------------------

from allora_trl.core.model import check_target_modules  # noqa: E402
from allora_trl.core.settings import ALLoRASettings, read_allora_config, save_allora_config  # noqa: E402


def test_config_records_scale_with_a_format_version_and_load_restores_it(tiny_model_dir, tmp_path, caplog):
    from allora_trl.core.update_scaling import enable_update_scaling

    model = apply_allora(peft_model(tiny_model_dir), eta=1.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert allora_settings(model).scale == "gradient"
    handle = enable_update_scaling(optimizer, model)  # the scale is recorded once it runs
    assert allora_settings(model).scale == "update"
    save_allora_adapter(model, tmp_path)
    saved = json.loads((tmp_path / ALLORA_CONFIG_NAME).read_text())
    assert saved == {
        "format_version": 1,
        "eta": 1.5,
        "coefficient": "weight",
        "scale": "update",
        "paper": "arXiv:2410.09692",
    }
    handle.remove()
    assert allora_settings(model).scale == "gradient"
    with caplog.at_level(logging.WARNING, logger="allora_trl.core.model"):
        reloaded = load_allora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert any("enable_update_scaling" in r.getMessage() for r in caplog.records)  # the saved scale is not lost
    assert read_allora_config(tmp_path).scale == "update"
    assert allora_settings(reloaded) == ALLoRASettings(eta=1.5, coefficient="weight", scale="gradient")
    enable_update_scaling(torch.optim.AdamW([p for p in reloaded.parameters() if p.requires_grad]), reloaded)
    assert allora_settings(reloaded) == ALLoRASettings(eta=1.5, coefficient="weight", scale="update")


def test_apply_allora_refuses_scale_update_which_needs_the_optimizer(tiny_model_dir, tmp_path):
    """apply_allora(scale="update") used to record "update" while only the gradient rule ran."""
    model = peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="enable_update_scaling.*ALLoRATrainer"):
        apply_allora(model, scale="update")
    assert allora_settings(model) is None  # nothing installed


def test_load_refuses_an_adapter_whose_scaling_is_not_one(tiny_model_dir, tmp_path):
    """load_allora_adapter on lora_alpha != r would change the adapter's outputs (PeftModel.from_pretrained's)."""
    model = peft_model(tiny_model_dir, lora_alpha=8, lora_dropout=0.0)  # r = 4: scaling 2
    randomise_B(model)
    model.save_pretrained(tmp_path)
    save_allora_config(ALLoRASettings(), tmp_path)
    with pytest.raises(ValueError, match=r"lora_alpha 8 != r 4.*PeftModel.from_pretrained") as info:
        load_allora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert "adapter_config.json" in str(info.value) and "\n" not in str(info.value)


def test_update_scale_with_output_coefficient_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="scale='update'.*coefficient='weight'"):
        apply_allora(peft_model(tiny_model_dir), coefficient="output", scale="update")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"eta": 0.5,', "not valid JSON.*line 1"),
        ("[1, 2]", "expected a JSON object.*got a JSON array"),
        ('{"etaa": 0.5}', "unknown key.*'etaa'"),
        ('{"format_version": 1, "eta": 0.5, "coefficient": "weight", "scale": "gradient", "extra": 1}', "'extra'"),
        ("{}", "format_version.*missing"),
        ('{"format_version": 1}', "missing key.*'coefficient', 'eta', 'scale'"),
        ('{"format_version": 1, "eta": 0.5, "coefficient": "weight"}', "missing key.*'scale'"),
        ('{"eta": 0.5, "coefficient": "weight", "scale": "update"}', "format_version.*missing"),
        ('{"format_version": 9, "eta": 0.5, "coefficient": "weight", "scale": "gradient"}', "newer allora-trl"),
        ('{"format_version": 1, "eta": true, "coefficient": "weight", "scale": "gradient"}', "eta"),
        ('{"format_version": 1, "eta": 1, "coefficient": "rows", "scale": "gradient"}', "coefficient"),
    ],
)
def test_bad_config_file_names_the_file_and_the_problem(tmp_path, content, message):
    (tmp_path / ALLORA_CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_allora_config(tmp_path)
    assert ALLORA_CONFIG_NAME in str(info.value)


def test_missing_folder_is_reported_as_missing_not_as_plain_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_allora_adapter(torch.nn.Linear(2, 2), tmp_path / "nope")
    assert "plain LoRA" not in str(info.value)


def test_folder_without_allora_config_points_to_peft(tmp_path):
    with pytest.raises(FileNotFoundError, match="PeftModel.from_pretrained"):
        read_allora_config(tmp_path)


def test_misspelt_target_module_is_an_error_naming_the_model_names(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_target_modules(base, ["q_proj", "v_proj"])
    check_target_modules(base, "all-linear")
    with pytest.raises(ValueError, match="'v_porj'.*q_proj.*v_proj") as info:
        check_target_modules(base, ["q_proj", "v_porj"], "lora_target_modules")
    assert "lora_target_modules" in str(info.value) and "'q_proj'" not in str(info.value)
    peft = peft_model(tiny_model_dir, target_modules=["q_proj"])  # also on a peft model: names are not hidden
    with pytest.raises(ValueError, match="q_proj") as info:
        check_target_modules(peft, ["x_proj"])
    assert "base_layer" not in str(info.value) and "lora_A" not in str(info.value)


def test_bitsandbytes_kernel_notice_is_held_until_4bit_lora_is_used(caplog):
    """peft's import of bitsandbytes warns about an optional 4-bit CPU kernel; only 4-bit users need to see it."""
    import logging

    from allora_trl.core import model as core_model

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addFilter(core_model._BNB_NOTICE)
    try:
        with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
            logger.warning("another bitsandbytes warning")
            assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    finally:
        logger.removeFilter(core_model._BNB_NOTICE)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        core_model._BNB_NOTICE.release()  # what apply_allora does when it meets a bitsandbytes Linear4bit layer
    assert any("gemm_4bit_forward" in r.getMessage() for r in caplog.records)
    assert core_model._BNB_NOTICE.held == []
