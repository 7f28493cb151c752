"""``allora_scale="update"``: the coefficient moves from the gradient to the optimizer's update."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from allora_trl import apply_allora
from allora_trl.core.gradient import weight_coefficient
from allora_trl.core.settings import validate_scale
from allora_trl.core.update_scaling import enable_update_scaling


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 20)
        self.down = torch.nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def lora_model(seed=0, nonzero_b=False):
    torch.manual_seed(seed)
    model = get_peft_model(TwoLayer(), LoraConfig(r=4, lora_alpha=4, target_modules=["up", "down"]))
    if nonzero_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 12, generator=g)
    y = torch.randn(16, 6, generator=g)
    return ((model(x) - y) ** 2).mean()


def one_step(model, optimizer):
    optimizer.zero_grad()
    loss_of(model).backward()
    optimizer.step()


def deltas(model, before):
    return {n: (p.detach() - before[n]) for n, p in lora_params(model).items()}


@pytest.mark.parametrize("eta", [1.0, 2.0, math.sqrt(2)])
def test_adam_step_at_b_zero_is_eta_times_plain_adam(eta):
    """At B = 0 one Adam step with `update` moves every row of B by eta x the plain Adam step (effective LR eta x lr)."""
    plain = lora_model()
    scaled = apply_allora(copy.deepcopy(plain), eta=eta)
    before = {n: p.detach().clone() for n, p in lora_params(plain).items()}

    opt_plain = torch.optim.Adam(lora_params(plain).values(), lr=1e-2)
    one_step(plain, opt_plain)
    opt_scaled = torch.optim.Adam(lora_params(scaled).values(), lr=1e-2)
    enable_update_scaling(opt_scaled, scaled)
    one_step(scaled, opt_scaled)

    d_plain, d_scaled = deltas(plain, before), deltas(scaled, before)
    for name in d_plain:
        if "lora_B" in name:
            assert d_plain[name].abs().max() > 1e-4  # Adam moved B by about lr per entry
            torch.testing.assert_close(d_scaled[name], eta * d_plain[name], rtol=1e-5, atol=1e-7)
        else:  # A gets no gradient while B is zero
            assert d_scaled[name].abs().max() == 0


def test_gradient_scaling_alone_is_divided_out_by_adam():
    """Why the extension exists: with the paper's gradient scaling Adam's first step is the plain Adam step."""
    plain = lora_model()
    scaled = apply_allora(copy.deepcopy(plain), eta=2.0)
    before = {n: p.detach().clone() for n, p in lora_params(plain).items()}
    for model in (plain, scaled):
        one_step(model, torch.optim.Adam(lora_params(model).values(), lr=1e-2))
    d_plain, d_scaled = deltas(plain, before), deltas(scaled, before)
    for name in d_plain:
        torch.testing.assert_close(d_scaled[name], d_plain[name], rtol=1e-4, atol=1e-7)


def test_sgd_update_scaling_equals_gradient_scaling():
    """Under plain SGD `update` and the paper's `gradient` rule give the same step, also away from B = 0."""
    base = lora_model(nonzero_b=True)
    by_gradient = apply_allora(copy.deepcopy(base), eta=2.0)
    by_update = apply_allora(copy.deepcopy(base), eta=2.0)
    before = {n: p.detach().clone() for n, p in lora_params(base).items()}
    one_step(by_gradient, torch.optim.SGD(lora_params(by_gradient).values(), lr=0.1))
    opt = torch.optim.SGD(lora_params(by_update).values(), lr=0.1)
    enable_update_scaling(opt, by_update)
    one_step(by_update, opt)
    d_gradient, d_update = deltas(by_gradient, before), deltas(by_update, before)
    for name in d_gradient:
        assert d_gradient[name].abs().max() > 0
        torch.testing.assert_close(d_update[name], d_gradient[name], rtol=1e-5, atol=1e-6)


def test_adam_away_from_zero_scales_rows_by_their_coefficient():
    """Away from B = 0: B's optimizer sees the plain gradient and row i of its step is scaled by c_i."""
    base = lora_model(nonzero_b=True)
    plain = apply_allora(copy.deepcopy(base), eta=2.0)
    scaled = apply_allora(copy.deepcopy(base), eta=2.0)
    coefficients = {}
    for name, module in scaled.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            coefficients[name] = weight_coefficient(
                module.lora_A["default"].weight, module.lora_B["default"].weight, 2.0
            )
    before = {n: p.detach().clone() for n, p in lora_params(base).items()}

    # Reference: Adam on the *plain LoRA* gradient of B (take the ALLoRA gradient and divide c out by hand).
    opt_plain = torch.optim.Adam(lora_params(plain).values(), lr=1e-2)
    opt_plain.zero_grad()
    loss_of(plain).backward()
    for name, module in plain.named_modules():
        if name in coefficients:
            module.lora_B["default"].weight.grad /= coefficients[name][:, None]
            module.lora_A["default"].weight.grad /= coefficients[name].mean()
    opt_plain.step()

    opt_scaled = torch.optim.Adam(lora_params(scaled).values(), lr=1e-2)
    enable_update_scaling(opt_scaled, scaled)
    one_step(scaled, opt_scaled)

    d_plain, d_scaled = deltas(plain, before), deltas(scaled, before)
    for layer, c in coefficients.items():
        assert c.min() < 2.0 - 1e-3  # really away from B = 0
        b_name = f"{layer}.lora_B.default.weight"
        a_name = f"{layer}.lora_A.default.weight"
        torch.testing.assert_close(d_scaled[b_name], c[:, None] * d_plain[b_name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(d_scaled[a_name], c.mean() * d_plain[a_name], rtol=1e-4, atol=1e-7)


def test_an_edit_between_backward_and_step_divides_out_the_coefficient_the_backward_applied():
    """Weights edited in place after the backward (a version bump): the hooks still divide out the ``c`` that backward
    applied, not one of the edited weights, so Adam's first step on B is exactly c_applied x lr x sign(g) per row."""
    model = apply_allora(lora_model(nonzero_b=True), eta=2.0)
    layer = model.base_model.model.up
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    applied = weight_coefficient(lora_A, lora_B, 2.0)
    opt = torch.optim.Adam(lora_params(model).values(), lr=1e-2, eps=1e-30)
    enable_update_scaling(opt, model)
    opt.zero_grad()
    loss_of(model).backward()
    with torch.no_grad():
        lora_B.mul_(3.0)  # after the backward: c of the edited weights is another one
    edited = lora_B.detach().clone()
    grad_sign = lora_B.grad.sign()
    opt.step()
    assert not torch.allclose(weight_coefficient(lora_A, edited, 2.0), applied, rtol=1e-2)
    torch.testing.assert_close(lora_B.detach() - edited, -1e-2 * applied[:, None] * grad_sign, rtol=1e-4, atol=1e-6)


def test_a_weight_frozen_between_steps_keeps_its_value_and_the_others_train():
    """The weights the hooks copy change from step to step (here one stops getting gradients): the copies follow."""
    model = apply_allora(lora_model(nonzero_b=True), eta=2.0)
    opt = torch.optim.Adam(lora_params(model).values(), lr=1e-2)
    enable_update_scaling(opt, model)
    one_step(model, opt)
    frozen = model.base_model.model.up.lora_A["default"].weight
    frozen.requires_grad_(False)
    kept = frozen.detach().clone()
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    one_step(model, opt)  # Adam skips a weight without a gradient; the hooks must too
    assert torch.equal(frozen, kept)
    assert all(not torch.equal(p, before[n]) for n, p in lora_params(model).items())


def test_remove_restores_the_plain_optimizer():
    plain = apply_allora(lora_model(), eta=2.0)
    scaled = copy.deepcopy(plain)
    before = {n: p.detach().clone() for n, p in lora_params(plain).items()}
    one_step(plain, torch.optim.Adam(lora_params(plain).values(), lr=1e-2))
    opt = torch.optim.Adam(lora_params(scaled).values(), lr=1e-2)
    enable_update_scaling(opt, scaled).remove()
    one_step(scaled, opt)
    for name, delta in deltas(plain, before).items():
        torch.testing.assert_close(deltas(scaled, before)[name], delta)


def test_trainable_non_lora_parameters_take_the_plain_step():
    """A bias or modules_to_save weight in the same optimizer must not be rescaled: only A and B are ALLoRA's."""
    models = [apply_allora(lora_model(nonzero_b=True), eta=2.0) for _ in range(2)]
    for model in models:
        model.base_model.model.down.base_layer.bias.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in lora_params(models[0]).items()}
    optimizers = [torch.optim.Adam(lora_params(m).values(), lr=1e-2) for m in models]
    enable_update_scaling(optimizers[1], models[1])
    for model, optimizer in zip(models, optimizers):
        one_step(model, optimizer)
    plain, scaled = deltas(models[0], before), deltas(models[1], before)
    bias = "base_model.model.down.base_layer.bias"
    assert plain[bias].abs().max() > 0
    torch.testing.assert_close(scaled[bias], plain[bias])
    assert not torch.allclose(
        scaled["base_model.model.down.lora_B.default.weight"], plain["base_model.model.down.lora_B.default.weight"]
    )


def test_errors_are_clear():
    model = lora_model()
    opt = torch.optim.Adam(lora_params(model).values(), lr=1e-2)
    with pytest.raises(ValueError, match="no ALLoRA layers"):
        enable_update_scaling(opt, model)
    output = apply_allora(lora_model(), coefficient="output")
    with pytest.raises(ValueError, match="allora_coefficient='weight'"):
        enable_update_scaling(torch.optim.Adam(lora_params(output).values()), output)
    assert validate_scale("update") == "update"
    with pytest.raises(ValueError, match="`allora_scale` must be one of 'gradient'.*'update'.*got 'both'"):
        validate_scale("both", "allora_scale")
