"""The plugin's hooks through Axolotl's real model loader (16/32-bit, 4-bit and 8-bit bases), its start-up checks,
and the shared statistics / checkpoint callback it registers."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = pytest.mark.axolotl

import torch  # noqa: E402
from axolotl.core.trainers.base import AxolotlTrainer  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from allora_trl import ALLORA_CONFIG_NAME, apply_allora, save_allora_adapter  # noqa: E402
from allora_trl.core.callback import ALLoRACallback  # noqa: E402
from allora_trl.core.model import iter_lora_layers  # noqa: E402
from allora_trl.core.variant import ALLoRALinearVariant  # noqa: E402
from allora_trl.integrations.axolotl import ALLoRAPlugin  # noqa: E402


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


@pytest.mark.parametrize("setting, layer_class", [("load_in_4bit", "Linear4bit"), ("load_in_8bit", "Linear8bitLt")])
def test_quantised_base_through_axolotls_loader(load_axolotl_cfg, setting, layer_class):
    """`load_in_4bit` / `load_in_8bit` with adapter: allora load a bitsandbytes base, prepared for k-bit training,
    with ALLoRA on every LoRA layer (Axolotl itself quantises only for its `qlora` / `lora` names)."""
    cfg = load_axolotl_cfg(**{setting: True})
    model, _ = load_model(cfg)
    layers = lora_layers(model)
    assert len(layers) == 14
    for layer in layers:
        assert type(layer.get_base_layer()).__name__ == layer_class
        assert type(layer.get_base_layer()).__module__.startswith("bitsandbytes.")
        assert isinstance(layer.lora_variant["default"], ALLoRALinearVariant) and layer.scaling["default"] == 1.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the quantised base is frozen


def test_quantisation_requested_but_not_applied_is_an_error(tiny_model_dir):
    """If the bitsandbytes config ever stops reaching `from_pretrained`, training must not go on at full precision."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RuntimeError, match="loaded unquantised"):
        ALLoRAPlugin().post_model_build(DictDefault({"adapter": "allora", "load_in_4bit": True}), model)
    ALLoRAPlugin().post_model_build(DictDefault({"adapter": "lora", "load_in_4bit": True}), model)  # not ours


def test_other_adapter_left_alone(load_axolotl_cfg):
    cfg = load_axolotl_cfg(
        adapter="lora",
        lora_alpha=16,
        lora_dropout=0.0,
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
    )
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
    """What the callback and the start-up hook use of Axolotl's SFT trainer: ``model``, ``args``, ``accelerator``
    and Axolotl's own ``store_metrics`` (the real method, on the metric store it expects)."""

    store_metrics = AxolotlTrainer.store_metrics

    def __init__(self, model, args=None, accelerator=None):
        self.model = model
        self.args = args if args is not None else SimpleNamespace(fsdp_plugin_args=None)
        self.accelerator = accelerator
        self._stored_metrics = defaultdict(lambda: defaultdict(lambda: {"values": [], "reduction": "mean"}))


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


@pytest.fixture()
def plain_lora_model(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


ALLORA_CFG = DictDefault({"adapter": "allora"})


def plugin_callback(trainer):
    (callback,) = ALLoRAPlugin().add_callbacks_post_trainer(ALLORA_CFG, trainer)
    return callback


def test_plugin_registers_the_shared_callback_with_checkpoint_records(allora_model):
    callback = plugin_callback(FakeTrainer(allora_model))
    assert type(callback) is ALLoRACallback and callback.write_checkpoint_config


def test_statistics_reach_axolotls_metric_store_on_logged_steps_only(allora_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=2, report_to=[])
    state = TrainerState(logging_steps=2)
    trainer = FakeTrainer(allora_model)
    callback = plugin_callback(trainer)

    run_step(callback, args, state, allora_model)  # step 1: not logged
    assert not trainer._stored_metrics["train"]
    run_step(callback, args, state, allora_model)  # step 2: logged
    stored = trainer._stored_metrics["train"]
    assert {k: v["reduction"] for k, v in stored.items()} == {
        "allora/coefficient_min": "min",
        "allora/coefficient_mean": "mean",
        "allora/coefficient_max": "max",
        "allora/row_norm_mean": "mean",
    }
    assert stored["allora/coefficient_max"]["values"] == [pytest.approx(2.0)]  # B == 0 at init: c = eta everywhere
    assert not any(v.stats.enabled for layer in lora_layers(allora_model) for v in layer.lora_variant.values())


def test_checkpoint_gets_allora_config(allora_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=5)
    (tmp_path / "checkpoint-5").mkdir()
    plugin_callback(FakeTrainer(allora_model)).on_save(args, state, TrainerControl(), model=allora_model)
    saved = json.loads((tmp_path / "checkpoint-5" / ALLORA_CONFIG_NAME).read_text())
    assert saved["eta"] == 2.0 and saved["coefficient"] == "weight"


def _accelerator_with_fsdp(version: int):
    plugin = SimpleNamespace(
        fsdp_version=version,
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        min_num_params=None,
        state_dict_type="FULL_STATE_DICT",
    )
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), num_processes=2)


def test_fsdp1_from_the_launch_environment_is_refused_at_trainer_creation(plain_lora_model, clean_env):
    """`accelerate launch` with an FSDP config that has no `fsdp_version` runs FSDP1: refused, as under TRL."""
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_version: 2"):
        ALLoRAPlugin().post_trainer_create(ALLORA_CFG, FakeTrainer(plain_lora_model))
    assert not lora_layers(plain_lora_model)[0].lora_variant  # refused before anything was installed

    clean_env.setenv("FSDP_VERSION", "2")
    ALLoRAPlugin().post_trainer_create(ALLORA_CFG, FakeTrainer(plain_lora_model))
    assert all(
        isinstance(layer.lora_variant["default"], ALLoRALinearVariant) for layer in lora_layers(plain_lora_model)
    )


def test_fsdp1_in_the_trainers_accelerator_is_refused(plain_lora_model, clean_env):
    with pytest.raises(ValueError, match="FSDP1"):
        ALLoRAPlugin().post_trainer_create(
            ALLORA_CFG, FakeTrainer(plain_lora_model, accelerator=_accelerator_with_fsdp(1))
        )
    ALLoRAPlugin().post_trainer_create(ALLORA_CFG, FakeTrainer(plain_lora_model, accelerator=_accelerator_with_fsdp(2)))


def test_start_up_check_skipped_for_other_adapters(plain_lora_model, clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "1")
    ALLoRAPlugin().post_trainer_create(DictDefault({"adapter": "lora"}), FakeTrainer(plain_lora_model))
    assert not lora_layers(plain_lora_model)[0].lora_variant


def test_a_frozen_reference_adapter_gets_no_rule(plain_lora_model, clean_env):
    """TRL's DPO/KTO copy a pre-built adapter into a frozen "ref" adapter: only the trained one gets ALLoRA."""
    plain_lora_model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert plain_lora_model.active_adapter == "default"
    ALLoRAPlugin().post_trainer_create(ALLORA_CFG, FakeTrainer(plain_lora_model))
    for layer in lora_layers(plain_lora_model):
        assert isinstance(layer.lora_variant["default"], ALLoRALinearVariant)
        assert "ref" not in layer.lora_variant and layer.scaling["ref"] == 2.0  # untouched


# ----- issue 19: nothing silent --------------------------------------------------------------------------------------


class Records(list):
    """Records of one logger, whatever Axolotl's logging set-up does with propagation."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("axolotl.integrations.allora")
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def test_continuing_a_plain_lora_adapter_says_the_settings_and_the_dropout(load_axolotl_cfg, tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    plain.save_pretrained(tmp_path / "plain")

    cfg = load_axolotl_cfg(lora_model_dir=str(tmp_path / "plain"))
    with Records() as records:
        model, _ = load_model(cfg)
    text = " ".join(records)
    assert "no allora_config.json" in text and "eta=2.0" in text and "coefficient='weight'" in text
    assert "lora_dropout=0.05" in text and "lora_dropout 0" in text
    assert all(isinstance(layer.lora_dropout["default"], torch.nn.Identity) for layer in lora_layers(model))


@pytest.mark.parametrize("auto", [False, True])
def test_resuming_with_another_eta_is_refused_naming_both_values(plain_lora_model, tmp_path, clean_env, auto):
    from allora_trl.core.settings import ALLoRASettings, save_allora_config

    checkpoint = tmp_path / "out" / "checkpoint-4"
    save_allora_config(ALLoRASettings(eta=2.0), checkpoint)
    resume = {"auto_resume_from_checkpoints": True} if auto else {"resume_from_checkpoint": str(checkpoint)}
    cfg = DictDefault({"adapter": "allora", "allora_eta": 5.0, "output_dir": str(tmp_path / "out"), **resume})
    with pytest.raises(ValueError, match=r"checkpoint-4.*allora_eta=2\.0.*allora_eta=5\.0.*new output_dir"):
        ALLoRAPlugin().post_trainer_create(cfg, FakeTrainer(plain_lora_model))
    same = DictDefault({**cfg, "allora_eta": 2.0})
    ALLoRAPlugin().post_trainer_create(same, FakeTrainer(plain_lora_model))  # the checkpoint's value: accepted
