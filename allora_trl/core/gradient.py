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
  before the square root. ``1/eta^2`` is never added where it would underflow or overflow: for ``eta <= 1`` the
  coefficient is computed as ``eta / sqrt(1 + eta^2 ||(BA)_i||)`` (no ``1/eta^2`` to overflow), for ``eta > 1`` as
  ``1/sqrt(||(BA)_i|| + 1/eta^2)`` capped at ``eta`` (its exact value at B = 0, where ``1/eta^2`` may flush to 0 in
  float32). So ``0 < c <= eta`` and c is finite for every eta that :func:`validate_eta` accepts (float32's normal
  range).
* Statistics for logging (:class:`CoefficientStats`) are taken in the *forward* pass, under ``no_grad`` and only
  while recording is on: the weight coefficient depends on the weights alone, and the output coefficient on the
  branch output, both known in forward. Nothing in the backward touches Python state, so ``torch.compile`` traces
  the backward without a graph break.

The paper's ablation ``coefficient="output"`` uses ``c_{t,i} = 1/sqrt(|f(x)_{t,i}| + 1/eta^2)`` per token from
the LoRA branch output itself: a genuinely per-sample coefficient, which needs the output saved for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def coefficient_from_norms(norms: torch.Tensor, eta: float) -> torch.Tensor:
    """``1/sqrt(norms + 1/eta^2)`` for non-negative ``norms``, finite for every float32-normal eta.

    Why not the formula as written: in float32 ``1/eta^2`` underflows to 0 for eta above about 1e19 (then
    ``c = 1/sqrt(0) = inf`` wherever B is zero, and the step turns the adapter into NaN) and overflows for eta below
    about 1e-19. For ``eta <= 1`` the algebraically equal ``eta / sqrt(1 + eta^2 norms)`` has no ``1/eta^2``; for
    ``eta > 1`` the ``1/eta^2`` term only matters near ``norms == 0``, where the exact value is ``eta``, so capping
    at ``eta`` restores it. Both forms are monotone in ``norms`` and give ``0 < c <= eta``.
    """
    if eta <= 1.0:
        return eta * torch.rsqrt(1.0 + (eta * eta) * norms)
    return torch.rsqrt(norms + 1.0 / (eta * eta)).clamp_max(eta)


def weight_coefficient(lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's default coefficient ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)``, shape (n_out,), at least float32."""
    return coefficient_from_norms(lora_row_norms(lora_A, lora_B), eta)


def output_coefficient(lora_output: torch.Tensor, eta: float) -> torch.Tensor:
    """The ablation's per-token coefficient ``c_{t,i} = 1/sqrt(|f(x)_{t,i}| + 1/eta^2)``, at least float32."""
    magnitude = lora_output.detach().to(torch.promote_types(lora_output.dtype, torch.float32)).abs()
    return coefficient_from_norms(magnitude, eta)


@dataclass
class CoefficientStats:
    """One layer's coefficient statistics from its last recorded forward pass, kept as 0-d tensors (no host sync).

    ``values`` holds ``coefficient_min|max|sum|count`` and ``row_norm_sum|count``; sums and counts rather than
    means, so that :func:`~allora_trl.core.stats.collect_allora_stats` can pool layers of different sizes.
    """

    enabled: bool = False
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def record(self, coefficient: torch.Tensor, row_norms: torch.Tensor) -> None:
        c = coefficient.detach().float()
        norms = row_norms.detach().float()
        self.values = {
            "coefficient_min": c.min(),
            "coefficient_max": c.max(),
            "coefficient_sum": c.sum(),
            "coefficient_count": torch.ones_like(c).sum(),  # a tensor even under torch.compile's dynamic shapes
            "row_norm_sum": norms.sum(),
            "row_norm_count": torch.ones_like(norms).sum(),
        }

    @torch.no_grad()
    def record_forward(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_output: torch.Tensor, eta: float, coefficient: str
    ) -> None:
        """Record the coefficient the coming backward pass will apply, computed here in forward."""
        row_norms = lora_row_norms(lora_A, lora_B)
        if coefficient == "output":
            self.record(output_coefficient(lora_output, eta), row_norms)
        else:
            self.record(coefficient_from_norms(row_norms, eta), row_norms)


def _in_dtype(coefficient: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 coefficient cast to the gradients' dtype, capped at its largest finite value (fp16: 65504)."""
    return coefficient.clamp_max(torch.finfo(dtype).max).to(dtype)


class ALLoRAFunction(torch.autograd.Function):
    """``y = (x A^T) B^T`` forward; the ALLoRA rule (module docstring) backward.

    ``x``: (..., n_in); ``lora_A``: (r, n_in); ``lora_B``: (n_out, r). All three share one dtype; the caller casts.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, eta: float, coefficient: str):
        hidden = x @ lora_A.T  # tokens x r: the same tensor vanilla LoRA keeps for grad_B
        output = hidden @ lora_B.T
        ctx.eta = eta
        ctx.coefficient = coefficient
        if coefficient == "output":
            ctx.save_for_backward(x, lora_A, lora_B, hidden, output)
        else:
            ctx.save_for_backward(x, lora_A, lora_B, hidden)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, hidden = ctx.saved_tensors[:4]
        eta = ctx.eta
        dtype = grad_output.dtype
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # tokens x n_out
        x_2d = x.reshape(-1, x.shape[-1])
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None

        if ctx.coefficient == "output":
            lora_output = ctx.saved_tensors[4]
            coeff = output_coefficient(lora_output, eta)  # same shape as the output
            scaled = grad_2d * _in_dtype(coeff, dtype).reshape(grad_2d.shape)  # G' = G * c, elementwise per token
            if need_B:
                grad_B = scaled.T @ hidden_2d
            if need_A:
                grad_A = (scaled @ lora_B).T @ x_2d
            if need_x:
                grad_x = ((grad_2d @ lora_B) @ lora_A).reshape(x.shape)
            return grad_x, grad_A, grad_B, None, None

        coeff = _in_dtype(weight_coefficient(lora_A, lora_B, eta), dtype)  # c_i, shape (n_out,)
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
        return grad_x, grad_A, grad_B, None, None


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
    weight gradients in the weights' dtype. With ``stats`` enabled, the coefficient the backward will apply is
    recorded into it here (see :class:`CoefficientStats`).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(device_type, enabled=False):
            output = ALLoRAFunction.apply(x, lora_A, lora_B, eta, coefficient)
    else:
        x = x.to(lora_A.dtype)
        output = ALLoRAFunction.apply(x, lora_A, lora_B, eta, coefficient)
    if stats is not None and stats.enabled:
        stats.record_forward(lora_A, lora_B, output, eta, coefficient)
    return output
