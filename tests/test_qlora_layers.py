"""ALLoRA on peft's bitsandbytes 4-bit / 8-bit LoRA layers (QLoRA), on CPU.

bitsandbytes >= 0.49 quantizes and runs 4-bit (nf4) and 8-bit linear layers on CPU; what is not covered here:
CUDA kernels, bf16 compute on GPU, and double quantization paths on GPU.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from allora_trl import apply_allora, weight_coefficient
from allora_trl.core.variant import ALLoRALinearVariant

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra: pip install -e .[test]")

QUANT = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"),
    "8bit": dict(load_in_8bit=True),
}


def quantized_peft_model(model_dir, kind, use_allora):
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu"
    )
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    return apply_allora(model) if use_allora else model


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_lora_layers_get_the_rule(tiny_model_dir, kind):
    ids = torch.randint(0, 100, (2, 8))
    grads = {}
    for use_allora in (False, True):
        model = quantized_peft_model(tiny_model_dir, kind, use_allora)
        layer = model.base_model.model.model.layers[1].mlp.down_proj
        assert type(layer).__module__ == "peft.tuners.lora.bnb"
        if use_allora:
            assert isinstance(layer.lora_variant["default"], ALLoRALinearVariant)
        model(ids, labels=ids).loss.backward()
        grads[use_allora] = layer
    vanilla, allora = grads[False], grads[True]
    c = weight_coefficient(allora.lora_A["default"].weight, allora.lora_B["default"].weight, 2.0)
    assert (c < 2.0).all()
    torch.testing.assert_close(
        allora.lora_B["default"].weight.grad, vanilla.lora_B["default"].weight.grad * c[:, None], rtol=1e-3, atol=1e-6
    )
    assert torch.isfinite(allora.lora_A["default"].weight.grad).all()
