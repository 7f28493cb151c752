"""torch.compile: ALLoRA with statistics on traces without graph breaks, and compiled gradients equal eager ones.

Statistics used to be recorded in the backward pass by mutating a Python object, which dynamo cannot trace inside
an autograd.Function: every ALLoRA layer broke the graph on logged steps. They are now taken in forward.
"""

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model

from allora_trl import apply_allora, collect_allora_stats, set_allora_stats_recording, weight_coefficient


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_model(use_allora, coefficient="weight"):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    if use_allora:
        apply_allora(model, eta=2.0, coefficient=coefficient)
        set_allora_stats_recording(model, True)
    return model


def graph_breaks(model, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(lambda inputs: model(inputs).sum())(x).graph_break_count


@pytest.mark.parametrize("coefficient", ["weight", "output"])
def test_statistics_on_add_no_graph_break_over_plain_lora(coefficient):
    x = torch.randn(3, 8)
    plain = graph_breaks(lora_model(False), x)
    allora = graph_breaks(lora_model(True, coefficient), x)
    assert allora <= plain


@pytest.mark.parametrize("coefficient", ["weight", "output"])
def test_compiled_gradients_and_statistics_equal_eager(coefficient):
    x = torch.randn(5, 8)
    results = {}
    for compiled in (False, True):
        model = lora_model(True, coefficient)
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        run(x).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[compiled] = grads, collect_allora_stats(model), model
    (eager_grads, eager_stats, eager_model), (compiled_grads, compiled_stats, _) = results[False], results[True]
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-6, atol=1e-8)
    assert compiled_stats and compiled_stats == pytest.approx(eager_stats, rel=1e-6)
    if coefficient == "weight":
        layer = eager_model.base_model.model.up
        c = weight_coefficient(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
        assert eager_stats["allora/coefficient_max"] >= c.max().item() - 1e-6
