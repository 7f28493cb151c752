"""ALLoRATrainer end to end on a tiny Llama: training, saving, reloading, resuming, and bad input."""

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
from trl import SFTConfig

from allora_trl import ALLORA_CONFIG_NAME, ALLoRAConfig, ALLoRATrainer
from allora_trl.core.variant import ALLoRALinearVariant


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,  # bf16 / checkpointing: ALLoRAConfig's CPU defaults (off) apply
        max_length=32,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return ALLoRAConfig(**values)


def lora(**kwargs):
    values = dict(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    values.update(kwargs)
    return LoraConfig(**values)


def make_trainer(tiny_model_dir, qa_dataset, args, **kwargs):
    model = kwargs.pop("model", None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir) if model is None else model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kwargs.setdefault("peft_config", lora())
    return ALLoRATrainer(model=model, args=args, train_dataset=qa_dataset, processing_class=tokenizer, **kwargs)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_training_changes_adapter_not_base_and_logs_stats(tiny_model_dir, qa_dataset, tmp_path):
    trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path))
    layers = [m for m in trainer.model.modules() if getattr(m, "lora_variant", None)]
    assert layers and all(isinstance(m.lora_variant["default"], ALLoRALinearVariant) for m in layers)
    base_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" not in k}
    lora_before = adapter_state(trainer.model)
    trainer.train()
    lora_after = adapter_state(trainer.model)
    assert all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before if "lora_B" in k)
    for k, v in trainer.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    logged = [entry for entry in trainer.state.log_history if "allora/coefficient_mean" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    for entry in logged:
        assert (
            0
            < entry["allora/coefficient_min"]
            <= entry["allora/coefficient_mean"]
            <= entry["allora/coefficient_max"]
            <= 2.0
        )
        assert entry["allora/row_norm_mean"] > 0
    # once B has moved away from zero the coefficient drops below eta
    assert logged[-1]["allora/coefficient_min"] < 2.0


def test_saved_adapter_reloads_in_vanilla_peft_and_merges(tiny_model_dir, qa_dataset, tmp_path):
    trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, max_steps=3, allora_eta=1.5))
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] and config["lora_dropout"] == 0
    assert json.loads((out / ALLORA_CONFIG_NAME).read_text())["eta"] == 1.5

    ids = torch.randint(0, 100, (2, 12))
    trained = trainer.model.eval()
    expected = trained(ids).logits.detach()
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    torch.testing.assert_close(vanilla(ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = vanilla.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_model_dir, qa_dataset, tmp_path):
    common = dict(
        max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    full = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path / "a", **common))
    full.train()

    first = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path / "b", **common), callbacks=[StopAt(3)])
    first.train()  # interrupted right after the checkpoint at step 3, same schedule as the full run
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert (checkpoint / ALLORA_CONFIG_NAME).is_file() and (checkpoint / "adapter_config.json").is_file()

    resumed = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path / "b", **common))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = adapter_state(full.model), adapter_state(resumed.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_peft_config_is_normalised_with_one_warning(tiny_model_dir, qa_dataset, tmp_path, caplog):
    config = lora(lora_alpha=16, lora_dropout=0.1, rank_pattern={"q_proj": 8})
    with caplog.at_level(logging.WARNING, logger="allora_trl.trainers.sft"):
        trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), peft_config=config)
    messages = [r.getMessage() for r in caplog.records if r.name == "allora_trl.trainers.sft"]
    assert len(messages) == 1
    assert "lora_alpha 16 -> 4" in messages[0] and "lora_dropout 0.1 -> 0.0" in messages[0]
    assert "alpha_pattern" in messages[0]
    saved = trainer.model.peft_config["default"]
    assert saved.lora_alpha == 4 and saved.lora_dropout == 0 and saved.alpha_pattern == {"q_proj": 8}
    assert config.lora_alpha == 16  # the user's object is not mutated


def test_default_lora_when_no_peft_config(tiny_model_dir, qa_dataset, tmp_path):
    trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), peft_config=None)
    config = trainer.model.peft_config["default"]
    assert config.r == config.lora_alpha == 16 and config.lora_dropout == 0


def test_existing_peft_model_gets_allora(tiny_model_dir, qa_dataset, tmp_path, caplog):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora(lora_alpha=8))
    with caplog.at_level(logging.WARNING, logger="allora_trl.trainers.sft"):
        trainer = ALLoRATrainer(
            model=model,
            args=make_args(tmp_path),
            train_dataset=qa_dataset,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        )
    assert any("lora_alpha 8 -> 4" in r.getMessage() for r in caplog.records)
    assert trainer.model.peft_config["default"].lora_alpha == 4
    assert any(
        isinstance(v, ALLoRALinearVariant)
        for m in trainer.model.modules()
        for v in getattr(m, "lora_variant", {}).values()
    )


@pytest.mark.parametrize("source", ["training_arguments", "sft_config"])
def test_plain_args_are_converted_without_losing_fields(tiny_model_dir, qa_dataset, tmp_path, source):
    common = dict(
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        learning_rate=1.234e-3,
        weight_decay=0.07,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=17,
        warmup_steps=3,
    )
    if source == "training_arguments":
        args = TrainingArguments(**common)
    else:
        args = SFTConfig(**common, bf16=False, gradient_checkpointing=False, max_length=48)
    trainer = make_trainer(tiny_model_dir, qa_dataset, args)
    assert isinstance(trainer.args, ALLoRAConfig)
    for key in ("learning_rate", "weight_decay", "seed", "warmup_steps", "max_steps", "output_dir"):
        assert getattr(trainer.args, key) == getattr(args, key), key
    if source == "sft_config":
        assert trainer.args.max_length == 48
    assert trainer.args.allora_eta == 2.0


def test_optimizer_groups_are_named_and_keep_weight_decay(tiny_model_dir, qa_dataset, tmp_path):
    trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, weight_decay=0.05))
    optimizer = trainer.create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"lora_A", "lora_B"}
    assert groups["lora_A"]["weight_decay"] == groups["lora_B"]["weight_decay"] == 0.05
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"allora_eta": 0.0}, "allora_eta"),
        ({"allora_eta": float("inf")}, "allora_eta"),
        ({"allora_eta": -2.0}, "allora_eta"),
        ({"allora_coefficient": "row"}, "allora_coefficient"),
    ],
)
def test_bad_config_values_fail_naming_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs, message", [({"use_dora": True}, "DoRA"), ({"use_rslora": True}, "rsLoRA")])
def test_dora_and_rslora_are_rejected_before_training(tiny_model_dir, qa_dataset, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), peft_config=lora(**kwargs))
    assert not (tmp_path / "out").exists()


def test_non_lora_peft_config_is_rejected(tiny_model_dir, qa_dataset, tmp_path):
    from peft import IA3Config

    with pytest.raises(ValueError, match="LoraConfig"):
        make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), peft_config=IA3Config(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("gpu", [False, True])
def test_precision_and_checkpointing_defaults_follow_the_machine(tmp_path, monkeypatch, gpu):
    """fp32 without checkpointing on a CPU (TRL's defaults are ~20x slower there); TRL's bf16 + checkpointing on a GPU."""
    import allora_trl.trainers.config as config_module

    monkeypatch.setattr(config_module, "accelerator_available", lambda: gpu)
    if gpu:  # transformers refuses bf16 on this CPU: check the defaults ALLoRA chose, before SFTConfig validates them
        monkeypatch.setattr(SFTConfig, "__post_init__", lambda self: None)
    args = ALLoRAConfig(output_dir=str(tmp_path), report_to="none")
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert args.bf16 is gpu and bool(checkpointing) is gpu
    assert ALLoRAConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is False  # use_cpu wins
    explicit = ALLoRAConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=not gpu, bf16=False)
    assert bool(getattr(explicit, "activation_checkpointing", None) or explicit.gradient_checkpointing) is (not gpu)


def test_gradient_checkpointing_and_accumulation_give_the_same_adapter(tiny_model_dir, qa_dataset, tmp_path):
    """The rule lives in the layers' autograd, so recomputation (checkpointing) and micro-batching change nothing."""
    runs = {
        "plain": dict(per_device_train_batch_size=4),
        "checkpointing": dict(
            per_device_train_batch_size=4,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        ),
        "accumulation": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
    }
    states = {}
    for name, overrides in runs.items():
        trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path / name, max_steps=3, **overrides))
        trainer.train()
        states[name] = adapter_state(trainer.model)
    for name in ("checkpointing", "accumulation"):
        for key, value in states["plain"].items():
            torch.testing.assert_close(states[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("scale, expected_factor", [("gradient", 1.0), ("update", 2.0)])
def test_allora_scale_update_gives_eta_times_the_adam_step_at_B_zero(
    tiny_model_dir, qa_dataset, tmp_path, scale, expected_factor
):
    """Adam divides out a gradient factor; allora_scale='update' applies eta to the step instead (the extension)."""
    lr = 1e-3
    args = make_args(
        tmp_path,
        max_steps=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        allora_scale=scale,
        weight_decay=0.0,
        optim="adamw_torch",
    )
    trainer = make_trainer(tiny_model_dir, qa_dataset, args)
    trainer.train()
    b_max = max(p.abs().max().item() for n, p in trainer.model.named_parameters() if "lora_B" in n)
    # Adam's first step moves each coordinate by lr * g/(|g| + eps) ~ lr; B started at 0
    assert b_max == pytest.approx(expected_factor * lr, rel=1e-3)


def test_allora_scale_update_needs_the_weight_coefficient(tmp_path):
    with pytest.raises(ValueError, match="allora_scale"):
        make_args(tmp_path, allora_scale="update", allora_coefficient="output")
    with pytest.raises(ValueError, match="allora_scale"):
        make_args(tmp_path, allora_scale="rows")


def test_one_seed_gives_one_start_and_another_seed_another(tiny_model_dir, qa_dataset, tmp_path):
    """TRL 1.9's SFTTrainer builds the peft model before transformers seeds: the trainer seeds first."""
    starts = []
    for run, seed in enumerate((3, 3, 4)):
        torch.manual_seed(1000 + run)  # whatever the global RNG was, the seed decides the start
        trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path / str(run), seed=seed))
        starts.append(adapter_state(trainer.model))
    for key in starts[0]:
        assert torch.equal(starts[0][key], starts[1][key]), key
    assert any(not torch.equal(starts[0][k], starts[2][k]) for k in starts[0] if "lora_A" in k)


def test_update_scaling_also_drives_a_users_optimizer(tiny_model_dir, qa_dataset, tmp_path):
    """optimizers=(my_optimizer, None) with allora_scale='update' used to fall back silently to the gradient rule."""
    lr = 1e-3
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    args = make_args(tmp_path, max_steps=1, learning_rate=lr, lr_scheduler_type="constant", allora_scale="update")
    trainer = ALLoRATrainer(
        model=model,
        args=args,
        train_dataset=qa_dataset,
        optimizers=(optimizer, None),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    assert (
        trainer.optimizer.optimizer is optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer is optimizer
    )
    b_max = max(p.abs().max().item() for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert b_max == pytest.approx(2.0 * lr, rel=1e-3)  # eta * Adam's first step, not Adam's plain one


def test_non_finite_loss_stops_training_before_saving(tiny_model_dir, qa_dataset, tmp_path):
    from allora_trl.core.callback import NonFiniteTrainingError

    class PoisonB(TrainerCallback):  # a diverged step, whatever caused it
        def on_step_end(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.fill_(float("nan"))

    args = make_args(tmp_path, max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(tiny_model_dir, qa_dataset, args, callbacks=[PoisonB()])
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):
        trainer.train()
    assert not (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").exists()
    with pytest.raises(NonFiniteTrainingError, match="Not saving"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_misspelt_target_module_is_refused_naming_the_layers(tiny_model_dir, qa_dataset, tmp_path):
    with pytest.raises(ValueError, match="v_porj.*q_proj"):
        make_trainer(
            tiny_model_dir, qa_dataset, make_args(tmp_path), peft_config=lora(target_modules=["q_proj", "v_porj"])
        )
    assert not (tmp_path / "out").exists()


def test_saved_settings_record_the_scale(tiny_model_dir, qa_dataset, tmp_path):
    trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, max_steps=1, allora_scale="update"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / ALLORA_CONFIG_NAME).read_text())
    assert saved["scale"] == "update" and saved["format_version"] >= 1
    card = (tmp_path / "final" / "README.md").read_text()
    assert "scale: update" in card and "eta: 2.0" in card


# ----- issue 19: nothing silent (other adapters, pre-trained adapters, resume with other settings) ----------------


def randomise_lora_B(model, adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f"lora_B.{adapter}." in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1


def adapter_logits(model, adapter, ids):
    """The logits of ``model`` with ``adapter`` active; the active adapter (and what is trainable) is restored.

    In place, not on a copy: a trainer wraps the model's forward in a closure that a deep copy would still call.
    """
    active, training = model.active_adapter, model.training
    model.eval()
    model.set_adapter(adapter)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.set_adapter(active)
        model.train(training)


def test_a_frozen_second_adapter_is_left_as_it_is(tiny_model_dir, qa_dataset, tmp_path):
    """Only the adapters being trained are set to ALLoRA's scaling: a frozen one keeps its alpha and its outputs."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora())
    model.add_adapter("other", lora(r=8, lora_alpha=16))
    randomise_lora_B(model, "other")
    ids = torch.randint(0, 100, (2, 10))
    before = adapter_logits(model, "other", ids)
    trainer = ALLoRATrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=qa_dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    assert trainer.allora_adapters == ["default"]
    assert trainer.model.peft_config["other"].lora_alpha == 16
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    torch.testing.assert_close(adapter_logits(model, "other", ids), before, rtol=0, atol=0)
    assert json.loads((tmp_path / "final" / "other" / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert not (tmp_path / "final" / "other" / ALLORA_CONFIG_NAME).exists()  # never given the rule


def test_a_pretrained_adapter_with_alpha_not_r_is_refused_and_left_unchanged(tiny_model_dir, qa_dataset, tmp_path):
    """Scaling 1 would change a trained adapter's outputs: refused in one line naming the fix, nothing changed."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora(lora_alpha=8))
    randomise_lora_B(model, "default")
    ids = torch.randint(0, 100, (2, 10))
    before = adapter_logits(model, "default", ids)
    with pytest.raises(ValueError, match=r"lora_alpha 8 != r 4.*merge_and_unload") as info:
        make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), model=model, peft_config=None)
    assert "\n" not in str(info.value)
    assert model.peft_config["default"].lora_alpha == 8
    torch.testing.assert_close(adapter_logits(model, "default", ids), before, rtol=0, atol=0)


def test_a_pretrained_adapter_with_only_dropout_is_normalised(tiny_model_dir, qa_dataset, tmp_path, caplog):
    """Dropout does not change a trained adapter's outputs: set to 0 with a warning, as before."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora(lora_dropout=0.05))
    randomise_lora_B(model, "default")
    with caplog.at_level(logging.WARNING, logger="allora_trl.trainers.sft"):
        trainer = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path), model=model, peft_config=None)
    assert any("lora_dropout 0.05 -> 0.0" in r.getMessage() for r in caplog.records)
    assert trainer.model.peft_config["default"].lora_dropout == 0


@pytest.mark.parametrize(
    "overrides, message, how",
    [
        ({"allora_eta": 4.0}, r"allora_eta=2\.0.*allora_eta=4\.0", "path"),
        ({"allora_eta": 5.0}, r"allora_eta=2\.0.*allora_eta=5\.0", "latest"),
        ({"allora_coefficient": "output"}, r"allora_coefficient='weight'.*allora_coefficient='output'", "path"),
        ({"allora_scale": "update"}, r"allora_scale='gradient'.*allora_scale='update'", "latest"),
    ],
)
def test_resume_with_other_allora_settings_is_refused(tiny_model_dir, qa_dataset, tmp_path, overrides, message, how):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, logging_steps=1)
    first = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, **common), callbacks=[StopAt(2)])
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / ALLORA_CONFIG_NAME).read_text())["eta"] == 2.0
    resumed = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, **common, **overrides))
    before = adapter_state(resumed.model)
    with pytest.raises(ValueError, match=message) as info:
        resumed.train(resume_from_checkpoint=str(checkpoint) if how == "path" else True)
    assert "checkpoint-2" in str(info.value) and "new output_dir" in str(info.value)
    assert resumed.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-4").exists()
    for key, value in adapter_state(resumed.model).items():
        assert torch.equal(value, before[key]), key


def test_resume_with_the_same_settings_is_accepted(tiny_model_dir, qa_dataset, tmp_path):
    common = dict(max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=2, allora_eta=3.0)
    first = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, **common), callbacks=[StopAt(1)])
    first.train()
    resumed = make_trainer(tiny_model_dir, qa_dataset, make_args(tmp_path, **common))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


def test_default_output_dir_names_the_trainer_by_a_class_attribute(tiny_model_dir):
    """Without ``args``: ``<model>-ALLoRA`` for SFT, ``<model>-ALLoRA-DPO`` for DPO, from a class attribute (not a test
    of the card name ``"ALLoRA (SFT)"``), so a subclass can choose its own."""
    import allora_trl

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = str(model.config._name_or_path).rstrip("/").split("/")[-1]
    for cls, expected in ((ALLoRATrainer, f"{name}-ALLoRA"), (allora_trl.ALLoRADPOTrainer, f"{name}-ALLoRA-DPO")):
        assert cls._resolve_args(cls.__new__(cls), None, model).output_dir == expected

    class Renamed(ALLoRATrainer):
        default_output_suffix = "-mine"

    assert Renamed._name == "ALLoRA (SFT)"
    assert Renamed._resolve_args(Renamed.__new__(Renamed), None, model).output_dir == f"{name}-ALLoRA-mine"
