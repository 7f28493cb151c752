"""End to end: ``axolotl train`` with ``adapter: allora`` and ``load_in_4bit: true`` (QLoRA) on CPU, bitsandbytes.

Axolotl 0.19 quantises the base only for its own adapter names; the plugin routes the bitsandbytes config through
``model_kwargs`` and prepares the quantised base itself. This checks that the base really trained in 4 bits (the
probe plugin records the LoRA layers' base layers during the first step), that the rule ran, and that the adapter
is plain LoRA loading on the 4-bit and on the full-precision base.
"""

import json

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

import torch  # noqa: E402
from axolotl_helpers import (  # noqa: E402
    PLUGIN,
    PROBE_PLUGIN,
    allora_log_history,
    assert_plain_lora_adapter,
    base_config,
    run_axolotl_train,
)
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from allora_trl.core.model import iter_lora_layers  # noqa: E402

STEPS = 4
ETA = 2.0


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qlora")
    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        plugins=[PLUGIN, PROBE_PLUGIN],
        load_in_4bit=True,
        allora_eta=ETA,
        micro_batch_size=2,
        max_steps=STEPS,
        save_steps=STEPS,
        logging_steps=1,
        learning_rate=0.01,
    )
    output = run_axolotl_train(cfg, tmp_path)
    return cfg, output, tmp_path / "out"


def test_base_is_4bit_during_training_and_the_rule_ran(qlora_run):
    cfg, output, out = qlora_run
    probe = json.loads((out / "probe.json").read_text())
    assert probe["base_layer_types"] == ["bitsandbytes.nn.modules.Linear4bit"]
    assert probe["quantization_method"] == "bitsandbytes"
    assert probe["adapters"] == {"default": {"lora_layers": 14, "allora_layers": 14, "trainable": 14}}
    assert "prepare_model_for_kbit_training" in output

    stats = allora_log_history(out / f"checkpoint-{STEPS}")
    assert [h["step"] for h in stats] == list(range(1, STEPS + 1))
    assert stats[0]["allora/coefficient_min"] == pytest.approx(ETA, rel=1e-4)  # B == 0: c == eta
    assert stats[-1]["allora/coefficient_mean"] < ETA - 1e-3 and stats[-1]["allora/row_norm_mean"] > 0

    for folder in (out, out / f"checkpoint-{STEPS}"):
        assert assert_plain_lora_adapter(folder, cfg["lora_r"])["eta"] == ETA


def _saved_lora_weights(out) -> dict:
    return {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k}


def _loaded_lora_B(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("quantised", [True, False], ids=["4bit-base", "full-precision-base"])
def test_adapter_loads_on_quantised_and_full_precision_base(qlora_run, tiny_model_dir, quantised):
    _, _, out = qlora_run
    kwargs = (
        {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")} if quantised else {}
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    model = PeftModel.from_pretrained(base, str(out))

    bases = {type(layer.get_base_layer()).__name__ for _, layer in iter_lora_layers(model)}
    assert bases == ({"Linear4bit"} if quantised else {"Linear"})
    assert {s for _, layer in iter_lora_layers(model) for s in layer.scaling.values()} == {1.0}

    saved, loaded = _saved_lora_weights(out), _loaded_lora_B(model)
    assert len(saved) == len(loaded) == 14
    assert all(v.abs().sum() > 0 for v in saved.values())  # the adapter trained
    for name, value in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].detach().float().cpu(), value.float())

    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert torch.isfinite(with_adapter).all()
    assert not torch.allclose(with_adapter, without)  # the loaded adapter changes the outputs
