"""The ALLoRA versions of TRL's DPO, GRPO, KTO, RLOO and Reward trainers, on a tiny Llama, CPU, offline.

For each: after construction the trained adapter carries the ALLoRA rule and no reference adapter does; the first
plain-SGD step from B = 0 gives B gradients eta times plain LoRA's (scaling 1, the TRL parent, the same start);
``allora/coefficient_mean`` is logged; ``allora_config.json`` and a card naming ALLoRA are in every checkpoint and
beside the final adapter; the adapter reloads in vanilla peft with identical outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

import allora_trl
from allora_trl import ALLORA_CONFIG_NAME
from allora_trl.core.variant import ALLoRALinearVariant

ETA = 2.0
PROMPTS = [f"Question: what colour is thing {i}?\nAnswer:" for i in range(8)]


def preference_rows():
    return [{"prompt": p, "chosen": " red", "rejected": " blue"} for p in PROMPTS]


def kto_rows():
    return [{"prompt": p, "completion": c, "label": c == " red"} for p in PROMPTS for c in (" red", " blue")]


def prompt_rows():
    return [{"prompt": p} for p in PROMPTS]


def char_reward(completions, **kwargs):
    """A deterministic reward with spread, so group-relative advantages are not all zero."""
    return [float(sum(map(ord, str(c))) % 97) for c in completions]


# name -> (TRL trainer, TRL config, rows, config overrides, model kind, extra trainer kwargs)
CASES = {
    "dpo": ("DPOTrainer", "DPOConfig", preference_rows, dict(max_length=48), "causal", {}),
    "kto": ("KTOTrainer", "KTOConfig", kto_rows, dict(max_length=48), "causal", {}),
    "grpo": (
        "GRPOTrainer",
        "GRPOConfig",
        prompt_rows,
        dict(num_generations=2, max_completion_length=6, per_device_train_batch_size=2, generation_batch_size=4),
        "causal",
        {"reward_funcs": char_reward},
    ),
    "rloo": (
        "RLOOTrainer",
        "RLOOConfig",
        prompt_rows,
        dict(num_generations=2, max_completion_length=6, per_device_train_batch_size=2, generation_batch_size=4),
        "causal",
        {"reward_funcs": char_reward},
    ),
    "reward": ("RewardTrainer", "RewardConfig", preference_rows, dict(max_length=48), "seq_cls", {}),
}
ALLORA_NAMES = {"dpo": "DPO", "kto": "KTO", "grpo": "GRPO", "rloo": "RLOO", "reward": "Reward"}


class RecordBGrads(TrainerCallback):
    """The LoRA B gradients of each optimizer step, as the optimizer is about to see them."""

    def __init__(self):
        self.model = None
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = self.model if self.model is not None else model
        self.steps.append(
            {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if "lora_B.default" in n and p.grad is not None
            }
        )


def load_base(tiny_model_dir, kind):
    if kind == "seq_cls":
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def lora_config(kind):
    return LoraConfig(
        r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="SEQ_CLS" if kind == "seq_cls" else "CAUSAL_LM",
    )


def config_values(tmp_path, overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        learning_rate=1e-3,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # a clipped step would divide eta out again
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        seed=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        per_device_train_batch_size=4,
    )
    values.update(overrides)
    return values


def build(name, tiny_model_dir, tmp_path, allora: bool, peft_model):
    trl_trainer, trl_config, rows, overrides, kind, extra = CASES[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    values = config_values(tmp_path, overrides)
    if allora:
        config_cls = getattr(allora_trl, f"ALLoRA{ALLORA_NAMES[name]}Config")
        trainer_cls = getattr(allora_trl, f"ALLoRA{ALLORA_NAMES[name]}Trainer")
        args = config_cls(**values, allora_eta=ETA)
    else:
        args = getattr(trl, trl_config)(**values)
        trainer_cls = getattr(trl, trl_trainer)
    recorder = RecordBGrads()
    trainer = trainer_cls(
        model=copy.deepcopy(peft_model),
        args=args,
        train_dataset=Dataset.from_list(rows()),
        processing_class=tokenizer,
        callbacks=[recorder],
        **extra,
    )
    recorder.model = trainer.model
    return trainer, recorder


@pytest.fixture(scope="module")
def peft_models(tiny_model_dir):
    """One start per model kind: a peft model with B = 0 (passed to both trainers, so the starts are equal)."""
    models = {}
    for kind in ("causal", "seq_cls"):
        torch.manual_seed(0)
        models[kind] = get_peft_model(load_base(tiny_model_dir, kind), lora_config(kind))
    return models


@pytest.mark.parametrize("name", list(CASES))
def test_trl_trainer_trains_with_allora_logs_saves_and_reloads(name, tiny_model_dir, tmp_path, peft_models):
    kind = CASES[name][4]
    trainer, recorder = build(name, tiny_model_dir, tmp_path / "allora", allora=True, peft_model=peft_models[kind])

    # the rule is on every LoRA layer of the trained adapter, and on no other adapter
    layers = [m for m in trainer.model.modules() if hasattr(m, "lora_variant")]
    assert layers and all(isinstance(m.lora_variant.get("default"), ALLoRALinearVariant) for m in layers)
    others = [(a, v) for m in layers for a, v in m.lora_variant.items() if a != "default"]
    assert all(not isinstance(v, ALLoRALinearVariant) for _, v in others), others
    assert trainer.allora_adapters == ["default"]

    trainer.train()
    plain, plain_recorder = build(name, tiny_model_dir, tmp_path / "plain", allora=False, peft_model=peft_models[kind])
    plain.train()

    # step 1 starts at B = 0, where c == eta exactly: the B gradients are eta times plain LoRA's
    first, plain_first = recorder.steps[0], plain_recorder.steps[0]
    assert first.keys() == plain_first.keys() and first
    assert any(g.abs().max() > 0 for g in plain_first.values())
    for key, grad in first.items():
        torch.testing.assert_close(grad, ETA * plain_first[key], rtol=1e-4, atol=1e-7, msg=key)

    logged = [e for e in trainer.state.log_history if "allora/coefficient_mean" in e]
    assert [e["step"] for e in logged] == [1, 2]
    assert logged[0]["allora/coefficient_mean"] == pytest.approx(ETA)

    out = tmp_path / "allora" / "final"
    trainer.save_model(str(out))
    for folder in (out, tmp_path / "allora" / "checkpoint-1", tmp_path / "allora" / "checkpoint-2"):
        assert json.loads((folder / ALLORA_CONFIG_NAME).read_text())["eta"] == ETA, folder
        card = (folder / "README.md").read_text()
        assert "2410.09692" in card and "- allora" in card and f"ALLoRA ({CASES[name][0][:-7]})" in card, folder
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == adapter["r"] and adapter["lora_dropout"] == 0

    ids = torch.randint(4, 100, (2, 10))
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_base(tiny_model_dir, kind), str(out)).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_vllm_generation_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="use_vllm"):
        allora_trl.ALLoRAGRPOConfig(**config_values(tmp_path, {}), use_vllm=True)


def test_configs_share_one_definition_of_the_allora_fields():
    from dataclasses import fields

    from allora_trl.trainers.config import ALLoRAArguments

    own = {f.name for f in fields(ALLoRAArguments) if f.name.startswith("allora_")}
    assert own == {"allora_eta", "allora_coefficient", "allora_scale"}
    for name in ("", *ALLORA_NAMES.values()):
        config = getattr(allora_trl, f"ALLoRA{name}Config")
        assert issubclass(config, ALLoRAArguments)
        assert {f.name for f in fields(config) if f.name.startswith("allora_")} == own
        assert "allora_eta" not in vars(config).get("__annotations__", {})  # inherited, not redefined


# ----- issue 19: nothing silent --------------------------------------------------------------------------------------


def test_dpo_refuses_a_pretrained_adapter_whose_scaling_is_not_one(tiny_model_dir, tmp_path):
    """Scaling 1 would change the adapter's outputs and its reference copy's: refused, the caller's model unchanged."""
    torch.manual_seed(0)
    model = get_peft_model(
        load_base(tiny_model_dir, "causal"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ids = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"lora_alpha 8 != r 4.*merge_and_unload.*DPOTrainer") as info:
        allora_trl.ALLoRADPOTrainer(
            model=model,
            args=allora_trl.ALLoRADPOConfig(**config_values(tmp_path, dict(max_length=48))),
            train_dataset=Dataset.from_list(preference_rows()),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        )
    assert "\n" not in str(info.value)
    assert model.peft_config["default"].lora_alpha == 8 and "ref" not in model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def inf_reward(completions, **kwargs):
    return [float("inf")] + [1.0] * (len(completions) - 1)


def test_a_non_finite_reward_stops_grpo_like_a_non_finite_loss(tiny_model_dir, tmp_path):
    from allora_trl.core.callback import NonFiniteTrainingError

    values = config_values(tmp_path, CASES["grpo"][3])
    trainer = allora_trl.ALLoRAGRPOTrainer(
        model=load_base(tiny_model_dir, "causal"),
        args=allora_trl.ALLoRAGRPOConfig(**values),
        train_dataset=Dataset.from_list(prompt_rows()),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=lora_config("causal"),
        reward_funcs=inf_reward,
    )
    with pytest.raises(NonFiniteTrainingError, match="reward"):
        trainer.train()
    assert not (tmp_path / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_nan_of_a_reward_function_that_returned_none_throughout_is_not_a_divergence():
    """TRL logs NaN for a reward function that returned None for every completion of a step: not a divergence."""
    from types import SimpleNamespace

    from allora_trl.core.callback import ALLoRACallback, NonFiniteTrainingError

    callback = ALLoRACallback(SimpleNamespace())
    state = SimpleNamespace(global_step=3)
    callback.on_log(None, state, None, logs={"loss": 0.1, "reward": 1.0, "rewards/maybe/mean": float("nan")})
    for logs in ({"rewards/maybe/mean": float("inf")}, {"reward": float("nan")}, {"rewards/chosen": float("-inf")}):
        with pytest.raises(NonFiniteTrainingError, match="non-finite"):
            callback.on_log(None, state, None, logs={"loss": 0.1, **logs})


def test_reward_trainer_without_peft_config_trains_a_classification_lora_and_the_score_head(tiny_model_dir, tmp_path):
    """No peft_config: a causal-LM LoRA used to fail with an AttributeError; now LoRA on the body, the head trained."""
    trainer = allora_trl.ALLoRARewardTrainer(
        model=load_base(tiny_model_dir, "seq_cls"),
        args=allora_trl.ALLoRARewardConfig(**config_values(tmp_path, dict(max_length=48, save_strategy="no"))),
        train_dataset=Dataset.from_list(preference_rows()),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    config = trainer.model.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and "score" in config.modules_to_save and config.r == config.lora_alpha == 16
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trainable) and not any("lora_" in n and "score" in n for n in trainable)
    score_before = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".score." in n and p.requires_grad
    }
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], value) for n, value in score_before.items())
