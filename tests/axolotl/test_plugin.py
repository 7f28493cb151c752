"""The plugin's hooks through Axolotl's real model loader, and its statistics / checkpoint callback."""

import json

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = pytest.mark.axolotl

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from allora_trl import ALLORA_CONFIG_NAME, apply_allora, save_allora_adapter  # noqa: E402
from allora_trl.integrations.axolotl import ALLoRACallback, ALLoRAPlugin  # noqa: E402
from allora_trl.core.model import iter_lora_layers  # noqa: E402
from allora_trl.core.variant import ALLoRALinearVariant  # noqa: E402


def load_model(cfg):
    """Tokenizer and model exactly as `axolotl train` loads them (runs the plugin hooks of the PluginManager)."""
    from axolotl.loaders import ModelLoader, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    return ModelLoader(cfg, tokenizer).load()


def lora_layers(model):
    return [layer for _, layer in iter_lora_layers(model) if "default" in layer.lora_A]


def test_model_loader_installs_allora(load_axolotl_cfg):
    cfg = load_axolotl_cfg(allora_eta=0.5, allora_coefficient="output")
    model, lora_config = load_model(cfg)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    for layer in layers:
        variant = layer.lora_variant["default"]
        assert isinstance(variant, ALLoRALinearVariant)
        assert (variant.eta, variant.coefficient) == (0.5, "output")
        assert layer.scaling["default"] == 1.0
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    saved = model.peft_config["default"]
    assert saved.lora_alpha == saved.r == 8 and saved.lora_dropout == 0.0
    # the config Axolotl pre-saves to output_dir at the start of training agrees with the model
    assert lora_config.lora_alpha == lora_config.r == 8 and lora_config.lora_dropout == 0.0


def test_other_adapter_left_alone(load_axolotl_cfg):
    cfg = load_axolotl_cfg(adapter="lora", lora_alpha=16, lora_dropout=0.0, lora_mlp_kernel=False,
                           lora_qkv_kernel=False, lora_o_kernel=False)
    model, _ = load_model(cfg)
    for layer in lora_layers(model):
        assert "default" not in layer.lora_variant
        assert layer.scaling["default"] == 2.0
    assert ALLoRAPlugin().add_callbacks_post_trainer(cfg, trainer=None) == []


def test_lora_model_dir_reuses_saved_settings(load_axolotl_cfg, tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    apply_allora(peft_model, eta=0.7, coefficient="weight")
    save_allora_adapter(peft_model, tmp_path / "adapter")

    cfg = load_axolotl_cfg(lora_model_dir=str(tmp_path / "adapter"))
    model, _ = load_model(cfg)
    etas = {layer.lora_variant["default"].eta for layer in lora_layers(model)}
    assert etas == {0.7}


def test_lora_model_dir_with_other_scaling_rejected(load_axolotl_cfg, tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "plain")

    cfg = load_axolotl_cfg(lora_model_dir=str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="scaling 1"):
        load_model(cfg)


class FakeTrainer:
    """What the callback uses of Axolotl's trainer: `model` and `store_metrics`."""

    def __init__(self, model):
        self.model = model
        self.stored = []

    def store_metrics(self, metrics, train_eval="train"):
        self.stored.append((train_eval, metrics))


def run_step(callback, args, state, model):
    control = TrainerControl()
    callback.on_step_begin(args, state, control, model=model)
    model(torch.randint(0, 100, (2, 6)), labels=torch.randint(0, 100, (2, 6))).loss.backward()
    state.global_step += 1
    callback.on_step_end(args, state, control, model=model)


@pytest.fixture()
def allora_model(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    return apply_allora(model, eta=2.0)


def test_callback_records_only_logged_steps_and_stores_metrics(allora_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=2, report_to=[])
    state = TrainerState(logging_steps=2)
    trainer = FakeTrainer(allora_model)
    callback = ALLoRACallback(trainer)

    run_step(callback, args, state, allora_model)  # step 1: not logged
    assert trainer.stored == []
    run_step(callback, args, state, allora_model)  # step 2: logged
    assert len(trainer.stored) == 1
    train_eval, metrics = trainer.stored[0]
    assert train_eval == "train"
    assert {k: reduction for k, (_, reduction) in metrics.items()} == {
        "allora/coefficient_min": "min",
        "allora/coefficient_mean": "mean",
        "allora/coefficient_max": "max",
        "allora/row_norm_mean": "mean",
    }
    assert metrics["allora/coefficient_max"][0] == pytest.approx(2.0)  # B == 0 at init: c = eta everywhere
    assert not any(v.stats.enabled for layer in lora_layers(allora_model) for v in layer.lora_variant.values())


def test_callback_without_store_metrics_adds_to_logs(allora_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=1, report_to=[])
    state = TrainerState(logging_steps=1)
    callback = ALLoRACallback(trainer=None)
    run_step(callback, args, state, allora_model)
    logs = {"loss": 1.0}
    callback.on_log(args, state, TrainerControl(), logs=logs, model=allora_model)
    assert set(logs) == {"loss", "allora/coefficient_min", "allora/coefficient_mean", "allora/coefficient_max",
                         "allora/row_norm_mean"}


def test_callback_on_save_writes_allora_config(allora_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=5)
    (tmp_path / "checkpoint-5").mkdir()
    ALLoRACallback(FakeTrainer(allora_model)).on_save(args, state, TrainerControl(), model=allora_model)
    saved = json.loads((tmp_path / "checkpoint-5" / ALLORA_CONFIG_NAME).read_text())
    assert saved["eta"] == 2.0 and saved["coefficient"] == "weight"
