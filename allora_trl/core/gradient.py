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

* ``c`` depends on ``A`` and ``B`` alone, so it is a constant between optimizer steps: it is computed once per step
  (:mod:`~allora_trl.core.coefficient_cache`), batched over every layer of one shape, and handed to each layer's
  backward as two small tensors, :class:`BackwardFactors`: ``c`` as a column and ``[B | c B]``.
* ``BA`` is never formed. ``||(BA)_i||^2 = b_i^T (A A^T) b_i`` uses the r x r Gram matrix of ``A``.
* ``G'`` is never formed either: ``grad_B = c * (G^T (X A^T))`` (row-scaling an n_out x r matrix) and
  ``G' B = G (c * B)``; one thin matmul ``G [B | c B]`` gives both ``G B`` (for grad_X) and ``G (c B)`` (for
  grad_A). So the backward has plain LoRA's four matmuls and one row scaling, where LoRA multiplies by its
  ``alpha/r`` scaling instead: no more operations than LoRA.
* The coefficient is computed in float32 (outside autocast) from the weights in the dtype the layer computes in
  (the autocast copies under autocast), and the squared norm is clamped at zero before the square root.
  ``1/eta^2`` is never added where it would underflow or overflow: for ``eta <= 1`` the coefficient is computed as
  ``eta / sqrt(1 + eta^2 ||(BA)_i||)``, for ``eta > 1`` as ``1/sqrt(||(BA)_i|| + 1/eta^2)`` capped at ``eta``
  (its exact value at B = 0, where ``1/eta^2`` may flush to 0 in float32). So ``0 < c <= eta`` and c is finite for
  every eta that :func:`~allora_trl.core.settings.validate_eta` accepts. It is then cast to the compute dtype,
  capped at that dtype's largest finite value (fp16: 65504).
* Statistics for logging (:class:`CoefficientStats`) are the coefficient the backward applies, recorded in the
  *forward* pass only while recording is on. Nothing in the backward touches Python state, so ``torch.compile``
  traces it without a graph break.

The paper's ablation ``coefficient="output"`` uses ``c_{t,i} = 1/sqrt(|f(x)_{t,i}| + 1/eta^2)`` per token from
the LoRA branch output itself: a genuinely per-sample coefficient, which needs the output saved for backward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F


def lora_row_norms(lora_A: torch.Tensor, lora_B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``||(BA)_{i,:}||_2`` for every output row i, from the r x r Gram matrix of A.

    ``lora_A`` (..., r, n_in), ``lora_B`` (..., n_out, r): one layer, or a stack of them. Computed in float32, or
    float64 for float64 weights: never in bf16/fp16, whose squares overflow or round away. ``out``: written there.
    With ``B`` transposed, ``b_i^T (A A^T) b_i`` is column i of ``(A A^T) B^T`` times ``B^T``, summed over r: the
    elementwise work and the sum run along n_out, not along r (a few elements).
    """
    dtype = row_norm_dtype(lora_A.dtype)
    a = _detached(lora_A, dtype)
    b_t = _detached(lora_B, dtype).transpose(-1, -2)  # (..., r, n_out)
    return _row_norms_from(a, b_t, out=out)


def _row_norms_from(a: torch.Tensor, b_t: torch.Tensor, out=None, gram_out=None, products_out=None) -> torch.Tensor:
    """:func:`lora_row_norms` of ``a`` (..., r, n_in) and ``b_t`` = B^T (..., r, n_out), both in the norms' dtype."""
    matmul = torch.bmm if a.dim() == 3 else torch.matmul  # bmm: the same kernel as @ on a stack, with less dispatch
    gram = matmul(a, a.transpose(-1, -2), out=gram_out)  # r x r
    products = matmul(gram, b_t, out=products_out).mul_(b_t)  # column i: (A A^T) b_i times b_i
    squared = torch.sum(products, dim=-2, out=out)  # b_i^T (A A^T) b_i
    return squared.clamp_min_(0.0).sqrt_()  # clamped first: rounding can dip below 0


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call when it already is (a no-op ``.to`` still costs a dispatch)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _detached(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.detach().to(dtype)``, with neither call where it is not needed."""
    return _as_dtype(tensor.detach() if tensor.requires_grad else tensor, dtype)


def row_norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64: ``torch.promote_types(dtype, torch.float32)`` without its dispatch."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficient_from_norms(norms: torch.Tensor, eta: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``1/sqrt(norms + 1/eta^2)`` for non-negative ``norms``, finite for every float32-normal eta.

    Why not the formula as written: in float32 ``1/eta^2`` underflows to 0 for eta above about 1e19 (then
    ``c = 1/sqrt(0) = inf`` wherever B is zero, and the step turns the adapter into NaN) and overflows for eta below
    about 1e-19. For ``eta <= 1`` the algebraically equal ``eta / sqrt(1 + eta^2 norms)`` has no ``1/eta^2``; for
    ``eta > 1`` the ``1/eta^2`` term only matters near ``norms == 0``, where the exact value is ``eta``, so capping
    at ``eta`` restores it. Both forms are monotone in ``norms`` and give ``0 < c <= eta``. ``out``: written there.
    """
    if eta <= 1.0:
        return torch.mul(norms, eta * eta, out=out).add_(1.0).rsqrt_().mul_(eta)
    return torch.add(norms, 1.0 / (eta * eta), out=out).rsqrt_().clamp_max_(eta)


def weight_coefficient(lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's default coefficient ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)``, shape (n_out,), at least float32."""
    return coefficient_from_norms(lora_row_norms(lora_A, lora_B), eta)


class BackwardFactors(NamedTuple):
    """What one layer's backward needs of the weight coefficient, in the dtype the layer computes in.

    With a leading layer dimension when built for a stack of layers (:func:`stacked_backward_factors`).
    """

    coefficient: torch.Tensor  # (n_out, 1): c, the row scaling of grad_B
    b_both: torch.Tensor  # (n_out, 2r): [B | c B], so that G [B | c B] = [G B | G (c B)]
    row_norms: torch.Tensor  # (n_out,): ||(BA)_i|| in float32 (float64 for float64 weights), for statistics


class FactorBuffers:
    """Where :func:`write_stacked_backward_factors` writes a stack's factors: tensors made once, whose per-layer
    views (the cache's entries) stay valid from step to step. ``c`` is (L, n_out), ``b_both`` (L, n_out, 2r);
    ``gram`` and ``products`` are intermediates."""

    __slots__ = ("c", "b_both", "row_norms", "gram", "products")

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype):
        """``lora_A`` (L, r, n_in), ``lora_B`` (L, n_out, r): a stack, or any tensors of its shapes."""
        (layers, rank, _), n_out, device = lora_A.shape, lora_B.shape[1], lora_A.device
        norm_dtype = row_norm_dtype(dtype)
        self.c = torch.empty(layers, n_out, dtype=dtype, device=device)
        self.b_both = torch.empty(layers, n_out, 2 * rank, dtype=dtype, device=device)
        self.row_norms = torch.empty(layers, n_out, dtype=norm_dtype, device=device)
        self.gram = torch.empty(layers, rank, rank, dtype=norm_dtype, device=device)
        self.products = torch.empty(layers, rank, n_out, dtype=norm_dtype, device=device)

    def factors(self) -> BackwardFactors:
        """The stacked factors: ``coefficient`` (L, n_out, 1), ``b_both`` (L, n_out, 2r), ``row_norms`` (L, n_out)."""
        return BackwardFactors(self.c.unsqueeze(-1), self.b_both, self.row_norms)


def stacked_backward_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, dtype: torch.dtype
) -> BackwardFactors:
    """:class:`BackwardFactors` of a stack of layers: ``lora_A`` (L, r, n_in), ``lora_B`` (L, n_out, r).

    The weights are cast to ``dtype`` first (what the layers multiply with: the autocast copies under autocast),
    then ``c`` is computed from them in float32 with autocast off, and cast back to ``dtype``. One call costs the
    same number of operations for one layer or for a hundred.
    """
    out = FactorBuffers(lora_A, lora_B, dtype)
    write_stacked_backward_factors(lora_A, lora_B, eta, dtype, out)
    return out.factors()


@torch.no_grad()
def write_stacked_backward_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, dtype: torch.dtype, out: FactorBuffers
) -> None:
    """:func:`stacked_backward_factors`, written into ``out``."""
    with _autocast_off(lora_A.device.type):
        a = _detached(lora_A, dtype)
        b = _detached(lora_B, dtype)
        norm_dtype = out.row_norms.dtype
        b_t = _as_dtype(b, norm_dtype).transpose(-1, -2)
        norms = _row_norms_from(
            _as_dtype(a, norm_dtype), b_t, out=out.row_norms, gram_out=out.gram, products_out=out.products
        )
        if dtype == norms.dtype:
            c = coefficient_from_norms(norms, eta, out=out.c)
        else:
            c = out.c.copy_(_in_dtype(coefficient_from_norms(norms, eta), dtype))
        torch.cat([b, b * c.unsqueeze(-1)], dim=-1, out=out.b_both)


def _autocast_off(device_type: str):
    """A context with autocast off on ``device_type``; none where it is off already (entering one costs ~2 us)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _factors_from_norms(b, norms, eta, dtype) -> BackwardFactors:
    """``c`` from the row norms, cast to ``dtype``, and ``[B | c B]``."""
    c = _in_dtype(coefficient_from_norms(norms, eta), dtype).unsqueeze(-1)
    return BackwardFactors(c, torch.cat([b, b * c], dim=-1), norms)


def traced_backward_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float, dtype: torch.dtype
) -> BackwardFactors:
    """One layer's :class:`BackwardFactors` inside a ``torch.compile`` graph: the same formula as
    :func:`stacked_backward_factors`, with the two small matmuls written as sums of products, which the compiler
    fuses with the rest into a few kernels instead of launching two matmul kernels per layer (1.09 -> 1.04 of
    LoRA's step on ``benchmarks.launch_bound``'s CPU model). Equal to the eager factors up to rounding.

    Unfused (a backend that does not fuse), the products are materialised: (r, r, n_in) and (n_out, r, r) elements;
    above 2^22 of those the matmul form is used.
    """
    r, n_in = lora_A.shape
    with torch.autocast(lora_A.device.type, enabled=False):
        a = _detached(lora_A, dtype)
        b = _detached(lora_B, dtype)
        if max(r * r * n_in, lora_B.shape[0] * r * r) > 2**22:
            return _factors_from_norms(b, lora_row_norms(a, b), eta, dtype)
        norm_dtype = row_norm_dtype(dtype)
        a_wide, b_wide = _as_dtype(a, norm_dtype), _as_dtype(b, norm_dtype)
        gram = (a_wide[:, None, :] * a_wide[None, :, :]).sum(-1)  # A A^T
        squared = (b_wide[:, :, None] * gram[None] * b_wide[:, None, :]).sum((1, 2))  # b_i^T (A A^T) b_i
        return _factors_from_norms(b, squared.clamp_min(0.0).sqrt(), eta, dtype)


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


def _in_dtype(coefficient: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 coefficient cast to the gradients' dtype, capped at its largest finite value (fp16: 65504)."""
    if dtype in _HOLD_EVERY_COEFFICIENT:  # c <= eta <= float32's largest value
        return _as_dtype(coefficient, dtype)
    return coefficient.clamp_max(torch.finfo(dtype).max).to(dtype)


_HOLD_EVERY_COEFFICIENT = (torch.float32, torch.float64, torch.bfloat16)


class ALLoRAFunction(torch.autograd.Function):
    """``y = (x A^T) B^T`` forward; the ALLoRA rule with the weight coefficient (module docstring) backward.

    ``x``: (..., n_in); ``lora_A``: (r, n_in); ``lora_B``: (n_out, r); ``coefficient`` (n_out, 1) and ``b_both``
    (n_out, 2r) from :class:`BackwardFactors`. All share one dtype; the caller casts. The backward is written with
    as few Python-level calls as the rule allows: where a step is bound by launching operations, each one counts.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, coefficient, b_both):
        # F.linear: the same matmuls as x @ A^T, without two Python-level transposes (the function runs with autocast
        # off, so it casts nothing)
        hidden = F.linear(x, lora_A)  # tokens x r: the same tensor vanilla LoRA keeps for grad_B
        ctx.save_for_backward(x, lora_A, hidden, coefficient, b_both)  # B is b_both[:, :r]
        return F.linear(hidden, lora_B)

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, hidden, coefficient, b_both = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        r = lora_A.shape[0]
        grad, x_shape = grad_output, x.shape  # G: tokens x n_out
        if grad.dim() != 2:  # tokens on one axis (views where possible; skipped for 2-D: each call counts)
            grad, hidden, x = grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, r), x.reshape(-1, x_shape[-1])
        grad_x = grad_A = grad_B = None
        if need_B:  # (G * c)^T (X A^T) == c * (G^T (X A^T))
            grad_B = torch.mm(grad.T, hidden).mul_(coefficient)
        if need_A and need_x:
            both = torch.mm(grad, b_both)  # [G B | G (c B)] in one thin matmul
            grad_x = torch.mm(both[:, :r], lora_A)  # G B A: the input gradient is not scaled
            grad_A = torch.mm(both[:, r:].T, x)  # ((G * c) B)^T X
        elif need_A:  # e.g. the first layer, whose input needs no gradient
            grad_A = torch.mm(torch.mm(grad, b_both[:, r:]).T, x)
        elif need_x:
            grad_x = torch.mm(torch.mm(grad, b_both[:, :r]), lora_A)
        if grad_x is not None and len(x_shape) != 2:
            grad_x = grad_x.view(x_shape)
        return grad_x, grad_A, grad_B, None, None


class ALLoRAOutputFunction(torch.autograd.Function):
    """``y = (x A^T) B^T`` forward; the paper's per-token ablation backward: ``c_{t,i}`` from the output itself."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, eta: float):
        hidden = F.linear(x, lora_A)
        output = F.linear(hidden, lora_B)
        ctx.eta = eta
        ctx.save_for_backward(x, lora_A, lora_B, hidden, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, hidden, output = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None
        coeff = output_coefficient(output, ctx.eta)  # same shape as the output
        scaled = grad * _in_dtype(coeff, grad.dtype).reshape(grad.shape)  # G' = G * c, elementwise per token
        if need_B:
            grad_B = scaled.T @ hidden.reshape(-1, hidden.shape[-1])
        if need_A:
            grad_A = (scaled @ lora_B).T @ x_2d
        if need_x:
            grad_x = ((grad @ lora_B) @ lora_A).reshape(x.shape)
        return grad_x, grad_A, grad_B, None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` while autocast is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a LoRA layer multiplies in: the autocast dtype under autocast (as ``F.linear``), else the weights'."""
    return autocast_dtype(device_type) or weight_dtype


def allora_lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    eta: float = 2.0,
    coefficient: str = "weight",
    stats: CoefficientStats | None = None,
    factors: BackwardFactors | None = None,
) -> torch.Tensor:
    """The LoRA branch ``B A x`` (scaling 1) whose backward applies the ALLoRA rule.

    Args:
        x (`torch.Tensor`): the layer input, (..., n_in).
        lora_A (`torch.Tensor`), lora_B (`torch.Tensor`): the adapter's weights, (r, n_in) and (n_out, r).
        eta (`float`): ALLoRA's eta. coefficient (`str`): ``"weight"`` (the paper's rule) or ``"output"``.
        stats (`CoefficientStats`, *optional*): records the coefficient the backward applies, when enabled.
        factors (`BackwardFactors`, *optional*): the weight coefficient for these weights in the compute dtype,
            as :mod:`~allora_trl.core.coefficient_cache` keeps it once per optimizer step; computed here if not
            given (one layer, one call).

    Returns:
        `torch.Tensor`: ``x A^T B^T``, (..., n_out), in the compute dtype.

    Under autocast the three tensors are cast to the autocast dtype here (as ``F.linear`` would do) and the
    function runs with autocast off, so forward and backward see one dtype; the casts' own backward returns the
    weight gradients in the weights' dtype.
    """
    device_type = x.device.type
    autocast = autocast_dtype(device_type)
    dtype = autocast or lora_A.dtype
    if coefficient == "output":
        x, lora_A, lora_B = _as_dtype(x, dtype), _as_dtype(lora_A, dtype), _as_dtype(lora_B, dtype)
        with torch.autocast(device_type, enabled=False):
            output = ALLoRAOutputFunction.apply(x, lora_A, lora_B, eta)
        if stats is not None and stats.enabled:
            stats.record(output_coefficient(output, eta), lora_row_norms(lora_A, lora_B))
        return output
    if factors is None:
        factors = stacked_backward_factors(lora_A[None], lora_B[None], eta, dtype)
        factors = BackwardFactors(*(t[0] for t in factors))
    if stats is not None and stats.enabled:
        stats.record(factors.coefficient, factors.row_norms)
    return weight_rule(x, lora_A, lora_B, factors, autocast)


def weight_rule(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, factors: BackwardFactors, cast_to
) -> torch.Tensor:
    """:class:`ALLoRAFunction` on ``x``, ``A``, ``B``, cast to ``cast_to``, the autocast dtype (None: autocast is off).

    The inner path of :func:`allora_lora_forward`, called directly by the LoRA variant: where a step is bound by
    launching operations, the few Python calls saved per layer show.
    """
    apply = ALLoRAFunction.apply
    if not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        apply = _apply_without_functorch
    if cast_to is None:
        if x.dtype != lora_A.dtype or lora_B.dtype != lora_A.dtype:
            x, lora_B = _as_dtype(x, lora_A.dtype), _as_dtype(lora_B, lora_A.dtype)
        return apply(x, lora_A, lora_B, factors.coefficient, factors.b_both)
    x, lora_A, lora_B = (
        _as_dtype(x, cast_to),
        _as_dtype(lora_A, cast_to),
        _as_dtype(lora_B, cast_to),
    )
    with torch.autocast(x.device.type, enabled=False):
        return apply(x, lora_A, lora_B, factors.coefficient, factors.b_both)


# ``Function.apply`` is a Python wrapper (functorch support: default arguments, dead wrappers) around the C++ apply
# of its base class; outside functorch transforms and torch.compile it only passes the arguments on, at about 2.4 us
# a call on a CPU, a share of a launch-bound step.
_apply_without_functorch = super(torch.autograd.Function, ALLoRAFunction).apply
