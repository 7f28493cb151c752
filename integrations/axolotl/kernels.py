"""ALLoRA versions of Axolotl 0.19's fused LoRA kernels (``lora_qkv_kernel``, ``lora_o_kernel``, ``lora_mlp_kernel``).

Axolotl's kernels (``axolotl.kernels.lora``: ``LoRA_QKV``, ``LoRA_O``, ``LoRA_MLP``) compute a block's projections
and their gradients by hand in one autograd Function each, bypassing peft's LoRA forward and with it the ALLoRA
variant. With ``adapter: allora`` the plugin lets Axolotl patch the model as it does for ``adapter: lora``, then
(``post_model_load``, right after Axolotl's ``apply_lora_kernel_patches``) rebinds the patched methods, on the
blocks whose LoRA layers carry the ALLoRA rule, to the functions here:

* ``apply_qkv`` -> :func:`allora_apply_qkv` (q, k, v; :func:`allora_apply_qk` where ``v_proj`` is None),
* ``apply_o`` -> :func:`allora_apply_o`,
* ``mlp.forward`` -> :func:`allora_apply_mlp_swiglu` / :func:`allora_apply_mlp_geglu`.

Forward is LoRA's at scaling 1 (``X W^T + b + (X A^T) B^T``, no dropout). In backward, with ``G`` the output
gradient of one projection and ``c`` its per-row coefficient (module ``allora_trl.core.gradient``)::

    [G B | G (c B)] = G @ [B | c B]      one thin product: G B for dX, G (c B) = (G * c) B for dA
    dA = (G (c B))^T X
    dB = c * (G^T (X A^T))               X A^T is kept from forward (tokens x r), not recomputed
    dX = G W + (G B) A                   the input gradient is not scaled

``c`` and ``[B | c B]`` come from the per-step coefficient cache
(:func:`allora_trl.core.coefficient_cache.backward_factors`), fetched at each forward in the dtype the kernel
multiplies in (the autocast dtype, else the LoRA weights'; before autocast is switched off around the kernel, as
the ALLoRA variant fetches them, so both paths share one cache entry per layer) and saved for backward. Only
``allora_coefficient: weight`` can run here (the per-token ``output`` coefficient needs the branch output per
token; the config validator refuses it with the kernels on).

What is taken from Axolotl: ``get_lora_parameters`` (base weight, bias, quantisation state, A, B of the active
adapter, FSDP2 unsharding), ``dequantize`` for 4-bit bases on CUDA (on other devices bitsandbytes' own
``dequantize_4bit``, since Axolotl's reads CUDA streams), and its Triton SwiGLU / GeGLU on CUDA (torch versions of
the same formulas elsewhere). A block whose active adapter carries no ALLoRA rule (adapters disabled or merged, a
plain LoRA adapter set active), or whose forward will see no backward (evaluation, generation: LoRA at scaling 1,
as the ALLoRA variant then runs too), is handed to Axolotl's own function unchanged, so Axolotl's LoRA, DoRA and dropout
paths are untouched. Written against Axolotl 0.19's kernel API; :func:`check_axolotl_version` refuses others.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from allora_trl.core import gradient
from allora_trl.core.coefficient_cache import backward_factors
from allora_trl.core.variant import ALLoRALinearVariant

from . import args
from .args import ALLORA_KERNEL_FIELDS


def check_axolotl_version(fields=ALLORA_KERNEL_FIELDS) -> None:
    """Raise unless the installed Axolotl is the one these kernels were written against (``args.KERNELS_AXOLOTL``)."""
    problem = args.kernel_version_problem(fields)
    if problem:
        raise RuntimeError(problem)


# ---------------------------------------------------------------------------------------------------------------
# One projection's tensors
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """A LoRA layer as the kernels see it: its frozen base (weight, bias, 4-bit state) and its ALLoRA adapter."""

    layer: torch.nn.Module
    adapter: str
    variant: ALLoRALinearVariant
    weight: torch.Tensor
    bias: torch.Tensor | None
    quant: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def _active_adapter(layer) -> str | None:
    active = getattr(layer, "active_adapters", None)
    if active is None:
        active = getattr(layer, "active_adapter", None)
    if isinstance(active, str):
        return active
    return active[0] if active and len(active) == 1 else None


def allora_variant(layer) -> tuple[str, ALLoRALinearVariant] | None:
    """(adapter, variant) when ``layer`` currently runs an ALLoRA adapter (active, not disabled, not merged)."""
    if (
        not hasattr(layer, "lora_variant")
        or getattr(layer, "disable_adapters", True)
        or getattr(layer, "merged", False)
    ):
        return None
    adapter = _active_adapter(layer)
    variant = layer.lora_variant.get(adapter) if adapter is not None else None
    if not isinstance(variant, ALLoRALinearVariant):
        if any(isinstance(v, ALLoRALinearVariant) for v in layer.lora_variant.values()) and adapter is None:
            raise RuntimeError(
                "adapter: allora: the fused LoRA kernels run one active adapter at a time; this layer has several "
                "active. Set `lora_qkv_kernel`, `lora_o_kernel` and `lora_mlp_kernel` to false."
            )
        return None
    return adapter, variant


def _projection(layer) -> Projection | None:
    found = allora_variant(layer)
    if found is None:
        return None
    adapter, variant = found
    if variant.coefficient != "weight":
        raise RuntimeError(
            f"adapter: allora: allora_coefficient={variant.coefficient!r} cannot run in Axolotl's fused LoRA kernels "
            "(only `weight`, the paper's rule, can). Set `allora_coefficient: weight`, or set `lora_qkv_kernel`, "
            "`lora_o_kernel` and `lora_mlp_kernel` to false."
        )
    from axolotl.kernels.lora import get_lora_parameters

    W, b, quant, A, B, _s, lora_bias, _dropout, magnitude = get_lora_parameters(layer)
    if A is None or lora_bias is not None or magnitude is not None:  # apply_allora refuses LoRA bias and DoRA
        raise RuntimeError(f"adapter: allora: unexpected LoRA layer for the fused kernels ({type(layer).__name__}).")
    return Projection(layer, adapter, variant, W, b, quant, A, B)


def _backward_will_run(X: torch.Tensor, layers) -> bool:
    if not torch.is_grad_enabled():
        return False
    if X.requires_grad:
        return True
    for layer in layers:
        adapter = _active_adapter(layer)
        if adapter in getattr(layer, "lora_A", {}) and (
            layer.lora_A[adapter].weight.requires_grad or layer.lora_B[adapter].weight.requires_grad
        ):
            return True
    return False


def _projections(X: torch.Tensor, layers) -> list[Projection] | None:
    """The layers' ALLoRA adapters, or None when none of them runs one, or when no backward will run (evaluation,
    generation: the forward is plain LoRA at scaling 1, as the ALLoRA variant's own): Axolotl's kernel serves them."""
    if not _backward_will_run(X, layers):
        return None
    found = [_projection(layer) for layer in layers]
    if all(p is None for p in found):
        return None
    if any(p is None for p in found):
        raise RuntimeError(
            "adapter: allora: a fused LoRA kernel covers several projections, and only some of them carry the "
            "ALLoRA rule. Give every projection of the block the same adapter, or set `lora_qkv_kernel`, "
            "`lora_o_kernel` and `lora_mlp_kernel` to false."
        )
    return found


def dense_weight(weight: torch.Tensor, quant, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense (n_out, n_in) tensor in ``dtype``: 4-bit bases are dequantised here, per call."""
    if quant is None:
        from axolotl.kernels.quantize import dequantize  # torchao Float8Tensor bases carry their own scale

        return dequantize(weight).to(dtype)
    if weight.is_cuda:
        from axolotl.kernels.quantize import dequantize

        return dequantize(weight, quant).to(dtype)
    import bitsandbytes.functional as bnbF  # Axolotl's fast path reads CUDA streams; bitsandbytes' runs anywhere

    return bnbF.dequantize_4bit(weight, quant).to(dtype)


def compute_dtype(X: torch.Tensor, projections: list[Projection]) -> torch.dtype:
    """What the kernels multiply in: the autocast dtype under autocast, else the LoRA weights' dtype.

    The same rule as the ALLoRA variant's own forward, so the per-step coefficient cache holds one entry per layer
    whichever path a layer runs.
    """
    return gradient.compute_dtype(X.device.type, projections[0].lora_A.dtype)


def backward_factors_of(projections: list[Projection], dtype: torch.dtype) -> tuple:
    """Each projection's ``BackwardFactors`` (``c`` as (n_out, 1) and ``[B | c B]``, in ``dtype``) for this step.

    Fetched before autocast is switched off around the kernel, as the variant's forward fetches them, and recorded
    into the layer's statistics on logged steps (what the variant's forward records).
    """
    found = []
    for p in projections:
        factors = backward_factors(p.layer, p.adapter, dtype)
        if factors is None:
            raise RuntimeError(f"adapter: allora: no ALLoRA coefficient for adapter {p.adapter!r} of this layer.")
        if p.variant.stats.enabled:
            p.variant.stats.record(factors.coefficient, factors.row_norms)
        found.append(factors)
    return tuple(found)


def _lora_forward(X2: torch.Tensor, p: Projection, factors, dtype: torch.dtype):
    """``X W^T + b + (X A^T) B^T`` for one projection; returns the output, A in dtype and X A^T (tokens x r)."""
    r = p.lora_A.shape[0]
    A = p.lora_A.to(dtype)
    out = F.linear(X2, dense_weight(p.weight, p.quant, dtype), None if p.bias is None else p.bias.to(dtype))
    hidden = X2 @ A.T  # kept for dB
    out.addmm_(hidden, factors.b_both[:, :r].T)  # [B | c B]'s first half is B in dtype
    return out, A, hidden


def _lora_backward(G, p: Projection, A, hidden, b_both, coefficient, need_x, need_A, need_B, dX):
    """One projection's ALLoRA backward: adds its share of the input gradient into ``dX`` (or starts it) and returns
    ``(dX, G (c B), dB)``; ``dA = (G (c B))^T X`` is left to the caller, who holds the projection's input."""
    r = A.shape[0]
    g_cb = dB = None
    if need_x:
        both = G @ b_both  # tokens x 2r: [G B | G (c B)], one product
        g_cb = both[:, r:]
        W = dense_weight(p.weight, p.quant, G.dtype)
        dX = G @ W if dX is None else dX.addmm_(G, W)
        del W
        dX.addmm_(both[:, :r], A)
    elif need_A:
        g_cb = G @ b_both[:, r:]
    if need_B:
        dB = (G.T @ hidden).mul_(coefficient).to(p.lora_B.dtype)  # c * (G^T (X A^T)): row i scaled by c_i
    return dX, g_cb, dB


def _grad_A(g_cb, inputs, p: Projection):
    return None if g_cb is None else (g_cb.T @ inputs).to(p.lora_A.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Projections sharing one input: q/k/v (LoRA_QKV, LoRA_QK) and o (LoRA_O)
# ---------------------------------------------------------------------------------------------------------------


class ALLoRA_Projections(torch.autograd.Function):
    """ALLoRA's ``LoRA_QKV`` / ``LoRA_QK`` / ``LoRA_O``: ``n`` LoRA projections of one input ``X``, ``n`` outputs.

    ``X`` arrives in the compute dtype, autocast off (see :func:`_run_projections`); ``factors`` are the
    projections' ``BackwardFactors``; ``lora`` is ``A_1, B_1, ..., A_n, B_n`` (the parameters, so that autograd
    routes dA, dB to them).
    """

    @staticmethod
    def forward(ctx, X, projections, factors, *lora):
        dtype = X.dtype
        X2 = X.reshape(-1, X.shape[-1])
        outputs, saved = [], [X2]
        for p, f in zip(projections, factors):
            out, A, hidden = _lora_forward(X2, p, f, dtype)
            outputs.append(out.view(*X.shape[:-1], out.shape[-1]))
            saved += [A, hidden, f.b_both, f.coefficient]
        ctx.save_for_backward(*saved)
        ctx.projections = projections
        ctx.x_shape = X.shape
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        X2, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dX, lora_grads = None, []
        for i, p in enumerate(ctx.projections):
            A, hidden, b_both, coefficient = saved[4 * i : 4 * i + 4]
            G = grads[i].reshape(-1, grads[i].shape[-1]).to(X2.dtype)
            need_A = need[3 + 2 * i]
            dX, g_cb, dB = _lora_backward(G, p, A, hidden, b_both, coefficient, need[0], need_A, need[4 + 2 * i], dX)
            lora_grads += [_grad_A(g_cb if need_A else None, X2, p), dB]
        if dX is not None:
            dX = dX.view(ctx.x_shape)
        return (dX, None, None, *lora_grads)


def _output_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Under autocast the outputs stay in the autocast dtype (as ``F.linear``'s); without, in the input's dtype."""
    return dtype if torch.is_autocast_enabled(X.device.type) else X.dtype


def _run_projections(X: torch.Tensor, projections: list[Projection]) -> tuple[torch.Tensor, ...]:
    dtype = compute_dtype(X, projections)
    factors = backward_factors_of(projections, dtype)
    out_dtype = _output_dtype(X, dtype)
    lora = [t for p in projections for t in (p.lora_A, p.lora_B)]
    with torch.autocast(X.device.type, enabled=False):
        outputs = ALLoRA_Projections.apply(X.to(dtype), tuple(projections), factors, *lora)
    return tuple(o.to(out_dtype) for o in outputs)


def allora_apply_qkv(self, X: torch.Tensor, inplace: bool = True):
    """``apply_qkv`` of an attention block: ALLoRA's kernel, or Axolotl's ``apply_lora_qkv`` without ALLoRA."""
    projections = _projections(X, (self.q_proj, self.k_proj, self.v_proj))
    if projections is None:
        from axolotl.kernels.lora import apply_lora_qkv

        return apply_lora_qkv(self, X, inplace)
    return _run_projections(X, projections)


def allora_apply_qk(self, X: torch.Tensor, inplace: bool = True):
    """``apply_qkv`` where ``v_proj`` is None (keys serve as values): returns (Q, K, K) as Axolotl's does."""
    projections = _projections(X, (self.q_proj, self.k_proj))
    if projections is None:
        from axolotl.kernels.lora import apply_lora_qk

        return apply_lora_qk(self, X, inplace)
    Q, K = _run_projections(X, projections)
    return Q, K, K


def allora_apply_o(self, X: torch.Tensor) -> torch.Tensor:
    """``apply_o`` of an attention block: ALLoRA's kernel, or Axolotl's ``apply_lora_o`` without ALLoRA."""
    projections = _projections(X, (self.o_proj,))
    if projections is None:
        from axolotl.kernels.lora import apply_lora_o

        return apply_lora_o(self, X)
    (out,) = _run_projections(X, projections)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Gated MLP: LoRA_MLP
# ---------------------------------------------------------------------------------------------------------------


def torch_swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, SiLU in float32, as Axolotl's Triton SwiGLU computes it (for tensors off CUDA)."""
    return F.silu(gate.float()).to(up.dtype) * up


def torch_swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(h, d gate, d up) of SwiGLU, the values Axolotl's Triton backward returns (not in place)."""
    g = gate.float()
    sig = torch.sigmoid(g)
    silu = (g * sig).to(grad.dtype)
    d_gate = ((grad * up).float() * sig * (1.0 + g * (1.0 - sig))).to(grad.dtype)
    return silu * up, d_gate, grad * silu


def torch_geglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate) * up`` with the exact (erf) GELU in float32, as Axolotl's Triton GeGLU computes it."""
    return F.gelu(gate.float()).to(up.dtype) * up


def torch_geglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    g = gate.float()
    cdf = 0.5 * (1.0 + torch.erf(g * 0.7071067811865476))
    gelu = (g * cdf).to(grad.dtype)
    d_gelu = cdf + 0.3989422804014327 * g * torch.exp(-0.5 * g * g)
    d_gate = ((grad * up).float() * d_gelu).to(grad.dtype)
    return gelu * up, d_gate, grad * gelu


def _activation(name: str, device: torch.device) -> tuple[Callable, Callable]:
    """Axolotl's Triton activation pair on CUDA, the torch one elsewhere."""
    if device.type == "cuda":
        from axolotl.kernels.lora import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward

        return (swiglu_forward, swiglu_backward) if name == "swiglu" else (geglu_forward, geglu_backward)
    if name == "swiglu":
        return torch_swiglu_forward, torch_swiglu_backward
    return torch_geglu_forward, torch_geglu_backward


class ALLoRA_MLP(torch.autograd.Function):
    """ALLoRA's ``LoRA_MLP``: ``down(act(gate(X), up(X)))`` with LoRA on all three, ALLoRA's rule on each.

    ``activation`` / ``activation_backward`` follow Axolotl's convention: the backward takes (d h, gate, up) as
    3-D tensors and returns (h, d gate, d up), possibly overwriting gate and up in place (its Triton kernels do).
    """

    @staticmethod
    def forward(ctx, X, projections, factors, activation, activation_backward, *lora):
        dtype = X.dtype
        X2 = X.reshape(-1, X.shape[-1])
        tokens = X2.shape[0]
        (gate_p, up_p, down_p), (f_g, f_u, f_d) = projections, factors
        gate, A_g, hid_g = _lora_forward(X2, gate_p, f_g, dtype)
        up, A_u, hid_u = _lora_forward(X2, up_p, f_u, dtype)
        h = activation(gate.view(1, tokens, -1), up.view(1, tokens, -1)).view(tokens, -1)
        out, A_d, hid_d = _lora_forward(h, down_p, f_d, dtype)
        ctx.save_for_backward(
            X2,
            gate,
            up,
            *(A_g, hid_g, f_g.b_both, f_g.coefficient),
            *(A_u, hid_u, f_u.b_both, f_u.coefficient),
            *(A_d, hid_d, f_d.b_both, f_d.coefficient),
        )
        ctx.projections = projections
        ctx.activation_backward = activation_backward
        ctx.x_shape = X.shape
        return out.view(*X.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        X2, gate, up, *saved = ctx.saved_tensors
        gate_p, up_p, down_p = ctx.projections
        # X, projections, factors, activation, activation_backward, A_g, B_g, A_u, B_u, A_d, B_d
        need = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:]
        tokens = X2.shape[0]
        G = grad_output.reshape(tokens, -1).to(X2.dtype)

        # down projection: its input h needs a gradient whatever is asked for X (gate and up depend on it)
        dh, g_cb_d, dB_d = _lora_backward(G, down_p, *saved[8:12], True, need[8], need[9], None)
        h, d_gate, d_up = ctx.activation_backward(
            dh.view(1, tokens, -1), gate.view(1, tokens, -1), up.view(1, tokens, -1)
        )
        h, d_gate, d_up = h.reshape(tokens, -1), d_gate.reshape(tokens, -1), d_up.reshape(tokens, -1)
        dA_d = _grad_A(g_cb_d if need[8] else None, h, down_p)

        dX, g_cb_g, dB_g = _lora_backward(d_gate, gate_p, *saved[0:4], need[0], need[4], need[5], None)
        dX, g_cb_u, dB_u = _lora_backward(d_up, up_p, *saved[4:8], need[0], need[6], need[7], dX)
        dA_g = _grad_A(g_cb_g if need[4] else None, X2, gate_p)
        dA_u = _grad_A(g_cb_u if need[6] else None, X2, up_p)
        if dX is not None:
            dX = dX.view(ctx.x_shape)
        return dX, None, None, None, None, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d


def _apply_mlp(self, X: torch.Tensor, name: str, axolotl_fn_name: str, inplace: bool):
    projections = _projections(X, (self.gate_proj, self.up_proj, self.down_proj))
    if projections is None:
        import axolotl.kernels.lora as axolotl_lora

        return getattr(axolotl_lora, axolotl_fn_name)(self, X, inplace)
    activation, activation_backward = _activation(name, X.device)
    dtype = compute_dtype(X, projections)
    factors = backward_factors_of(projections, dtype)
    out_dtype = _output_dtype(X, dtype)
    lora = [t for p in projections for t in (p.lora_A, p.lora_B)]
    with torch.autocast(X.device.type, enabled=False):
        out = ALLoRA_MLP.apply(X.to(dtype), tuple(projections), factors, activation, activation_backward, *lora)
    return out.to(out_dtype)


def allora_apply_mlp_swiglu(self, X: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """``forward`` of a SwiGLU MLP block (gate/up/down): ALLoRA's kernel, or Axolotl's without ALLoRA."""
    return _apply_mlp(self, X, "swiglu", "apply_lora_mlp_swiglu", inplace)


def allora_apply_mlp_geglu(self, X: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """``forward`` of a GeGLU MLP block: ALLoRA's kernel, or Axolotl's without ALLoRA."""
    return _apply_mlp(self, X, "geglu", "apply_lora_mlp_geglu", inplace)


# ---------------------------------------------------------------------------------------------------------------
# Installing them where Axolotl installed its own
# ---------------------------------------------------------------------------------------------------------------

# Axolotl's functions (axolotl.kernels.lora) -> ALLoRA's, by the attribute Axolotl binds them to.
_REPLACEMENTS = {
    "apply_lora_qkv": ("apply_qkv", allora_apply_qkv, ("q_proj", "k_proj", "v_proj")),
    "apply_lora_qk": ("apply_qkv", allora_apply_qk, ("q_proj", "k_proj")),
    "apply_lora_o": ("apply_o", allora_apply_o, ("o_proj",)),
    "apply_lora_mlp_swiglu": ("forward", allora_apply_mlp_swiglu, ("gate_proj", "up_proj", "down_proj")),
    "apply_lora_mlp_geglu": ("forward", allora_apply_mlp_geglu, ("gate_proj", "up_proj", "down_proj")),
}
_KIND = {"apply_qkv": "qkv", "forward": "mlp", "apply_o": "o"}
# Instance attributes through which Axolotl 0.19 routes a module to one of its LoRA kernels.
_PATCHED_ATTRIBUTES = ("apply_qkv", "apply_o", "forward", "apply_in_proj_fused", "apply_out_proj")


def _axolotl_kernel(bound) -> str | None:
    """The name of the Axolotl kernel function ``bound`` (an instance attribute) runs, if it is one."""
    func = getattr(bound, "__func__", bound)
    module = getattr(func, "__module__", "") or ""
    if module in ("axolotl.kernels.lora", "axolotl.monkeypatch.lora_kernels") and callable(func):
        name = func.__name__
        if name.startswith("original_"):
            return None  # Axolotl's plain (peft) projections: the ALLoRA variant runs in them
        return name
    return None


def _carries_allora(module: torch.nn.Module) -> bool:
    return any(
        isinstance(v, ALLoRALinearVariant) for m in module.modules() for v in getattr(m, "lora_variant", {}).values()
    )


def install_allora_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Rebind the Axolotl kernels patched into ``model`` to ALLoRA's, where the block carries ALLoRA; return counts.

    Raises, naming the setting to turn off, where Axolotl routed an ALLoRA layer through a kernel that has no ALLoRA
    version (the linear-attention projections of Qwen3.5-style models), so the rule can never be skipped silently.
    """
    counts = {"qkv": 0, "o": 0, "mlp": 0}
    unsupported = set()
    for name, module in model.named_modules():
        for attribute in _PATCHED_ATTRIBUTES:
            bound = module.__dict__.get(attribute)
            kernel = _axolotl_kernel(bound) if bound is not None else None
            if kernel is None:
                continue
            replacement = _REPLACEMENTS.get(kernel)
            if replacement is None:
                if _carries_allora(module):
                    unsupported.add(f"{name}.{attribute} ({kernel})")
                continue
            target, function, projections = replacement
            owner = getattr(bound, "__self__", module)  # the block Axolotl bound its kernel to
            if not any(_carries_allora(getattr(owner, p)) for p in projections if getattr(owner, p, None) is not None):
                continue
            setattr(module, target, types.MethodType(function, owner))
            counts[_KIND[target]] += 1
    if unsupported:
        raise RuntimeError(
            "adapter: allora: Axolotl routed ALLoRA layers through fused LoRA kernels that have no ALLoRA version: "
            f"{', '.join(sorted(unsupported)[:4])}{' ...' if len(unsupported) > 4 else ''}. "
            "Set `lora_qkv_kernel: false` and `lora_o_kernel: false` for this model."
        )
    return counts


__all__ = [
    "ALLoRA_MLP",
    "ALLoRA_Projections",
    "allora_apply_mlp_geglu",
    "allora_apply_mlp_swiglu",
    "allora_apply_o",
    "allora_apply_qk",
    "allora_apply_qkv",
    "check_axolotl_version",
    "install_allora_kernels",
]
