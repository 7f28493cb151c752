"""The weight coefficient once per optimizer step, not once per layer per micro-batch.

``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)`` depends on ``A`` and ``B`` alone, so between two optimizer steps it is a
constant. Recomputing it in every layer's backward (Gram matrix, row norms, rsqrt, casts: about a dozen small
operations per layer) made ALLoRA's step 1.3-1.4x LoRA's on a GPU wherever the step is bound by launching
operations. Here it is computed at the first forward after the weights change, for every layer of one shape at
once (:func:`~allora_trl.core.gradient.stacked_backward_factors`), and each layer's backward reads its
:class:`~allora_trl.core.gradient.BackwardFactors`.

When is an entry stale? Its key holds:

* the number of optimizer steps taken in this process (a global ``torch.optim`` step hook counts them: fused AdamW
  changes weights without bumping their ``_version``, and DeepSpeed writes its weights after its own inner
  optimizer's step, which is why the refresh is lazy, at the next forward, not in the hook);
* the weights' ``_version`` (``copy_`` under ``no_grad``, peft's re-initialisation) and, where the weights are
  whole, their storage (``param.data = ...``, a parameter replaced by a new one); ``load_state_dict`` (and so
  resuming) also clears the layer's entry through a hook;
* the compute dtype (autocast on or off) and whether inference mode is on (tensors made there cannot be saved for
  backward later).

An edit through ``param.data`` in place is invisible to all of these: call :func:`refresh_allora_coefficients`
after one. Gradient checkpointing's recomputed forward runs before the step, so it finds the entry its original
forward used.

Sharded weights (FSDP2, DeepSpeed ZeRO-3) are whole only inside their own layer's forward: there each layer
refreshes alone, still once per step (the key then leaves out the storage, which FSDP2 reallocates at every
gather). Whole weights (one process, DDP, ZeRO-1/2) are refreshed in one batched call. The cache is plain Python
state, not module buffers, so DDP does not broadcast it.

Under ``torch.compile`` the factors are computed inside the graph instead (once per forward, fused by the compiler
into a few kernels): a cache lookup there would make dynamo guard on the step count and recompile every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .gradient import BackwardFactors, compute_dtype, stacked_backward_factors

_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)  # every torch optimizer, fused or not, in this process


@dataclass
class _Entry:
    key: tuple
    factors: BackwardFactors


def _forget_layer_entries(layer: torch.nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the layer's weights may have changed in a way no version counter shows."""
    for variant in layer.lora_variant.values():
        if hasattr(variant, "cache_entry"):
            variant.cache_entry = None


def _is_sharded(weight: torch.Tensor) -> bool:
    """A weight that is not whole outside its layer's forward: an FSDP2 DTensor or a DeepSpeed ZeRO-3 parameter."""
    return hasattr(weight, "ds_id") or hasattr(weight, "device_mesh") or weight.dim() != 2


class CoefficientCache:
    """The weight coefficients of one ALLoRA adapter's layers (one per :func:`~allora_trl.apply_allora` call).

    ``refreshes`` counts the batched and single-layer refreshes (for tests and benchmarks).
    """

    def __init__(self):
        self.members: list[tuple[torch.nn.Module, str, object]] = []  # (LoRA layer, adapter name, its variant)
        self.sharded = False
        self.refreshes = 0

    def add(self, layer: torch.nn.Module, adapter_name: str, variant) -> None:
        self.members.append((layer, adapter_name, variant))
        if not getattr(layer, "_allora_watches_loads", False):
            layer.register_load_state_dict_post_hook(_forget_layer_entries)
            layer._allora_watches_loads = True

    def _key(self, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> tuple:
        key = (_optimizer_steps, dtype, torch.is_inference_mode_enabled(), lora_A._version, lora_B._version)
        if self.sharded:
            return key
        return (*key, lora_A.data_ptr(), lora_B.data_ptr())

    def factors(self, variant, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> BackwardFactors:
        """The factors for these weights in ``dtype``: cached, or refreshed now (with every stale layer if whole)."""
        entry = variant.cache_entry
        if entry is not None and entry.key == self._key(lora_A, lora_B, dtype):
            return entry.factors
        if not self.sharded:
            self._refresh_all()
        entry = variant.cache_entry
        key = self._key(lora_A, lora_B, dtype)
        if entry is None or entry.key != key:  # sharded, or not a member (a copied variant): this layer alone
            self._refresh([(variant, lora_A, lora_B, dtype, key)])
        return variant.cache_entry.factors

    def _live_members(self):
        for layer, name, variant in self.members:
            if layer.lora_variant.get(name) is variant:
                yield variant, layer.lora_A[name].weight, layer.lora_B[name].weight

    def _refresh_all(self) -> None:
        """Refresh every stale member with whole weights, batched; note when some are sharded."""
        stale = []
        for variant, lora_A, lora_B in self._live_members():
            if _is_sharded(lora_A) or _is_sharded(lora_B):
                self.sharded = True
                return
            dtype = compute_dtype(lora_A.device.type, lora_A.dtype)
            key = self._key(lora_A, lora_B, dtype)
            entry = variant.cache_entry
            if entry is None or entry.key != key:
                stale.append((variant, lora_A, lora_B, dtype, key))
        if stale:
            self._refresh(stale)

    @torch.no_grad()
    def _refresh(self, stale: list) -> None:
        """One :func:`stacked_backward_factors` call per group of layers sharing shapes, dtypes, device and eta.

        ``stale``: ``(variant, lora_A, lora_B, compute dtype, key)`` per layer.
        """
        groups: dict[tuple, list] = {}
        for item in stale:
            variant, lora_A, lora_B, dtype, _ = item
            signature = (lora_A.shape, lora_B.shape, lora_A.dtype, lora_B.dtype, lora_A.device, dtype, variant.eta)
            groups.setdefault(signature, []).append(item)
        for (*_, dtype, eta), items in groups.items():
            factors = stacked_backward_factors(
                torch.stack([item[1] for item in items]), torch.stack([item[2] for item in items]), eta, dtype
            )
            per_layer = zip(*(tensor.unbind() for tensor in factors))
            for (variant, *_, key), layer_factors in zip(items, per_layer):
                variant.cache_entry = _Entry(key, BackwardFactors(*layer_factors))
            self.refreshes += 1

    def clear(self) -> None:
        """Forget every entry: the next forward recomputes them."""
        for _, _, variant in self.members:
            variant.cache_entry = None
        self.sharded = False


def applied_coefficient(variant, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``c`` as the layer's last backward applied it (in its compute dtype), as float32 (n_out,): what
    ``allora_scale="update"`` divides out of the gradients and puts on the update, so both see one coefficient."""
    entry = variant.cache_entry
    dtype = entry.factors.coefficient.dtype if entry is not None else lora_A.dtype
    return variant.cache.factors(variant, lora_A, lora_B, dtype).coefficient[:, 0].float()


def refresh_allora_coefficients(model: torch.nn.Module) -> None:
    """Make every ALLoRA layer of ``model`` recompute its coefficient at its next forward.

    Needed only after editing LoRA weights in place through ``param.data`` (which bumps no version counter);
    optimizer steps, ``load_state_dict``, resuming and ``copy_`` under ``no_grad`` are noticed by themselves.
    """
    for module in model.modules():
        for variant in getattr(module, "lora_variant", {}).values():
            if getattr(variant, "cache", None) is not None:
                variant.cache.clear()


def backward_factors_for(variant, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> BackwardFactors:
    """The layer's :class:`BackwardFactors` for the coming backward.

    Eager: from the cache. In a ``torch.compile`` graph: computed in the graph, where the compiler fuses them into
    the layer's own kernels; reading Python state there would make dynamo guard on the step count and recompile
    every step.
    """
    if torch.compiler.is_compiling():
        factors = stacked_backward_factors(lora_A[None], lora_B[None], variant.eta, dtype)
        return BackwardFactors(*(tensor[0] for tensor in factors))
    return variant.cache.factors(variant, lora_A, lora_B, dtype)


def backward_factors(layer: torch.nn.Module, adapter_name: str, dtype: torch.dtype) -> BackwardFactors | None:
    """The :class:`BackwardFactors` of ``layer``'s adapter ``adapter_name`` in ``dtype``, or None if that adapter
    has no ALLoRA variant with the weight coefficient. For code that computes the LoRA branch itself (fused
    kernels): call it in forward and save the tensors for backward."""
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if getattr(variant, "cache", None) is None or variant.coefficient != "weight":
        return None
    return backward_factors_for(variant, layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, dtype)
