"""The ALLoRA gradient rule, in one place.

ALLoRA (Huang & Balestriero, arXiv 2410.09692) keeps LoRA's forward pass, ``f(x) = W x + B A x`` with scaling 1
and no dropout, and changes only how the gradients of ``A`` (r x n_in) and ``B`` (n_out x r) are formed. With
``G`` the gradient of the loss with respect to the LoRA branch output ``B A x`` (tokens x n_out):

    c_i     = 1 / sqrt( ||(BA)_{i,:}||_2 + 1/eta^2 )          (one coefficient per output row i; the norm is
                                                               *not* squared inside the square root)
    G'      = G * c                                           (c broadcast over the output-feature axis)
    grad_B  = G'^T (X A^T)
    grad_A  = (G' B)^T X
    grad_X  = G B A                                           (the input gradient is *not* scaled)

``c`` is a constant of the step: no gradient flows through it. Because ``c`` depends on the weights only, scaling
each sample's gradient by it is the same as scaling the batch gradient, so gradient accumulation, data parallelism
and sharding see exactly the same rule.

How it is computed, so that it costs what plain LoRA costs:

* ``BA`` is never formed. ``||(BA)_i||^2 = b_i^T (A A^T) b_i`` uses the r x r Gram matrix of ``A``.
* ``G'`` is never formed either: ``grad_B = c * (G^T (X A^T))`` (row-scaling an n_out x r matrix) and
  ``G' B = G (c * B)``, so the only extra backward work is one thin ``tokens x n_out x r`` matmul, about r/n_in
  of the frozen layer's own cost.
* The coefficient is computed in float32 whatever the weights' dtype, and the squared norm is clamped at zero
  before the square root, so it is always finite and ``c <= eta``.

The paper's ablation ``coefficient="output"`` uses ``c_{t,i} = 1/sqrt(|f(x)_{t,i}| + 1/eta^2)`` per token from
the LoRA branch output itself: a genuinely per-sample coefficient, which needs the output saved for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

COEFFICIENTS = ("weight", "output")


def lora_row_norms(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``||(BA)_{i,:}||_2`` for every output row i, from the r x r Gram matrix of A.

    Computed in float32, or float64 for float64 weights: never in bf16/fp16, whose squares overflow or round away.
    """
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    a = lora_A.detach().to(dtype)
    b = lora_B.detach().to(dtype)
    gram = a @ a.T  # r x r
    squared = ((b @ gram) * b).sum(dim=-1).clamp_min(0.0)  # b_i^T (A A^T) b_i, clamped: rounding can dip below 0
    return squared.sqrt()


def weight_coefficient(lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's default coefficient ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)``, shape (n_out,), at least float32."""
    return (lora_row_norms(lora_A, lora_B) + 1.0 / eta**2).rsqrt()


def output_coefficient(lora_output: torch.Tensor, eta: float) -> torch.Tensor:
    """The ablation's per-token coefficient ``c_{t,i} = 1/sqrt(|f(x)_{t,i}| + 1/eta^2)``, at least float32."""
    return (lora_output.detach().to(torch.promote_types(lora_output.dtype, torch.float32)).abs() + 1.0 / eta**2).rsqrt()


@dataclass
class CoefficientStats:
    """Running statistics of one layer's last recorded backward pass, kept as tensors (no host sync)."""

    enabled: bool = False
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, coefficient: torch.Tensor, row_norms: torch.Tensor) -> None:
        c = coefficient.detach().float()
        self.values = {
            "coefficient_min": c.min(),
            "coefficient_max": c.max(),
            "coefficient_sum": c.sum(),
            "coefficient_count": torch.tensor(float(c.numel()), device=c.device),
            "row_norm_sum": row_norms.detach().float().sum(),
            "row_norm_count": torch.tensor(float(row_norms.numel()), device=c.device),
        }


class ALLoRAFunction(torch.autograd.Function):
    """``y = (x A^T) B^T`` forward; the ALLoRA rule (module docstring) backward.

    ``x``: (..., n_in); ``lora_A``: (r, n_in); ``lora_B``: (n_out, r). All three share one dtype; the caller casts.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, eta: float, coefficient: str, stats: CoefficientStats | None):
        hidden = x @ lora_A.T  # tokens x r: the same tensor vanilla LoRA keeps for grad_B
        output = hidden @ lora_B.T
        ctx.eta = eta
        ctx.coefficient = coefficient
        ctx.stats = stats
        if coefficient == "output":
            ctx.save_for_backward(x, lora_A, lora_B, hidden, output)
        else:
            ctx.save_for_backward(x, lora_A, lora_B, hidden)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, hidden = ctx.saved_tensors[:4]
        eta, stats = ctx.eta, ctx.stats
        dtype = grad_output.dtype
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # tokens x n_out
        x_2d = x.reshape(-1, x.shape[-1])
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None

        if ctx.coefficient == "output":
            lora_output = ctx.saved_tensors[4]
            coeff = output_coefficient(lora_output, eta)  # same shape as the output
            if stats is not None and stats.enabled:
                stats.record(coeff, lora_row_norms(lora_A, lora_B))
            scaled = grad_2d * coeff.reshape(grad_2d.shape).to(dtype)  # G' = G * c, elementwise per token
            if need_B:
                grad_B = scaled.T @ hidden_2d
            if need_A:
                grad_A = (scaled @ lora_B).T @ x_2d
            if need_x:
                grad_x = ((grad_2d @ lora_B) @ lora_A).reshape(x.shape)
            return grad_x, grad_A, grad_B, None, None, None

        row_norms = lora_row_norms(lora_A, lora_B)
        coeff = (row_norms + 1.0 / eta**2).rsqrt()  # c_i, shape (n_out,)
        if stats is not None and stats.enabled:
            stats.record(coeff, row_norms)
        coeff = coeff.to(dtype)
        if need_B:
            grad_B = (grad_2d.T @ hidden_2d) * coeff[:, None]  # (G * c)^T (X A^T) == c * (G^T (X A^T))
        if need_A and need_x:
            # One thin matmul gives both G B (for grad_X) and G (c * B) == (G * c) B (for grad_A).
            r = lora_B.shape[1]
            both = grad_2d @ torch.cat([lora_B, lora_B * coeff[:, None]], dim=1)
            grad_x = (both[:, :r] @ lora_A).reshape(x.shape)
            grad_A = both[:, r:].T @ x_2d
        elif need_A:
            grad_A = (grad_2d @ (lora_B * coeff[:, None])).T @ x_2d
        elif need_x:
            grad_x = ((grad_2d @ lora_B) @ lora_A).reshape(x.shape)
        return grad_x, grad_A, grad_B, None, None, None


def allora_lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    eta: float = 2.0,
    coefficient: str = "weight",
    stats: CoefficientStats | None = None,
) -> torch.Tensor:
    """The LoRA branch ``B A x`` (scaling 1) whose backward applies the ALLoRA rule.

    Under autocast the three tensors are cast to the autocast dtype here (as ``F.linear`` would do) and the
    function runs with autocast off, so forward and backward see one dtype; the casts' own backward returns the
    weight gradients in the weights' dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return ALLoRAFunction.apply(x, lora_A, lora_B, eta, coefficient, stats)
    x = x.to(lora_A.dtype)
    return ALLoRAFunction.apply(x, lora_A, lora_B, eta, coefficient, stats)


def validate_eta(eta: float, field_name: str = "eta") -> float:
    """Return ``eta`` as a float, or raise naming the field: eta must be finite and > 0."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"`{field_name}` must be a positive finite number (e.g. 2.0), got {eta!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{field_name}` must be a positive finite number (e.g. 2.0, the paper's default), got {eta!r}.")
    return value


def validate_coefficient(coefficient: str, field_name: str = "coefficient") -> str:
    """Return ``coefficient`` if it is one of ``COEFFICIENTS``, else raise naming the field and the choices."""
    if coefficient not in COEFFICIENTS:
        raise ValueError(
            f"`{field_name}` must be one of {', '.join(repr(c) for c in COEFFICIENTS)} "
            f"('weight' is the paper's rule, 'output' its per-token ablation), got {coefficient!r}."
        )
    return coefficient
