"""The rule as it was computed before the per-step cache: the weight coefficient recomputed in every layer's backward.

Kept as the reference the cache is checked against (``tests/test_coefficient_cache.py``): same forward, and a
backward that forms ``c`` from the saved (compute-dtype) weights each time it runs. ``use_per_microbatch_rule``
swaps it into every ALLoRA layer, so a whole training run can be repeated with it.
"""

from __future__ import annotations

import contextlib

import torch

from allora_trl.core import variant as variant_module
from allora_trl.core.gradient import weight_coefficient


def _in_dtype(coefficient, dtype):
    return coefficient.clamp_max(torch.finfo(dtype).max).to(dtype)


class PerMicrobatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, eta: float):
        hidden = x @ lora_A.T
        ctx.eta = eta
        ctx.save_for_backward(x, lora_A, lora_B, hidden)
        return hidden @ lora_B.T

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, hidden = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None
        coeff = _in_dtype(weight_coefficient(lora_A, lora_B, ctx.eta), grad_output.dtype)
        if need_B:
            grad_B = (grad_2d.T @ hidden.reshape(-1, hidden.shape[-1])) * coeff[:, None]
        if need_A and need_x:
            r = lora_B.shape[1]
            both = grad_2d @ torch.cat([lora_B, lora_B * coeff[:, None]], dim=1)
            grad_x = (both[:, :r] @ lora_A).reshape(x.shape)
            grad_A = both[:, r:].T @ x_2d
        elif need_A:
            grad_A = (grad_2d @ (lora_B * coeff[:, None])).T @ x_2d
        elif need_x:
            grad_x = ((grad_2d @ lora_B) @ lora_A).reshape(x.shape)
        return grad_x, grad_A, grad_B, None


def per_microbatch_forward(self, module, active_adapter, x, result, **kwargs):
    lora_A = module.lora_A[active_adapter].weight
    lora_B = module.lora_B[active_adapter].weight
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(device_type, enabled=False):
            output = PerMicrobatchFunction.apply(x, lora_A, lora_B, self.eta)
    else:
        output = PerMicrobatchFunction.apply(x.to(lora_A.dtype), lora_A, lora_B, self.eta)
    return result + output.to(result.dtype)


@contextlib.contextmanager
def use_per_microbatch_rule():
    """Within the block, every ALLoRA layer (weight coefficient) computes c in its own backward, as before."""
    original = variant_module.ALLoRALinearVariant.forward
    variant_module.ALLoRALinearVariant.forward = per_microbatch_forward
    try:
        yield
    finally:
        variant_module.ALLoRALinearVariant.forward = original
