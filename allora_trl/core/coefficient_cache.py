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

from .gradient import (
    BackwardFactors,
    FactorBuffers,
    autocast_dtype,
    stacked_backward_factors,
    traced_backward_factors,
    write_stacked_backward_factors,
)

_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)  # every torch optimizer, fused or not, in this process


@dataclass(slots=True)
class _Entry:
    key: tuple
    factors: BackwardFactors
    update: tuple | None = None  # (c, its mean) as allora_scale="update" divides by them, kept by a batched refresh


def _forget_layer_entries(layer: torch.nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the layer's weights may have changed in a way no version counter shows."""
    for variant in layer.lora_variant.values():
        if hasattr(variant, "cache_entry"):
            variant.cache_entry = None


def _is_stale(entry: _Entry | None, key: tuple) -> bool:
    return entry is None or entry.key != key


_WHOLE_TYPES = frozenset((torch.nn.Parameter, torch.Tensor))


def _is_sharded(weight: torch.Tensor) -> bool:
    """A weight that is not whole outside its layer's forward: an FSDP2 DTensor or a DeepSpeed ZeRO-3 parameter.

    Any other tensor subclass counts as sharded too: refreshing layer by layer is right for every kind of weight,
    only slower.
    """
    return type(weight) not in _WHOLE_TYPES or weight.dim() != 2 or "ds_id" in weight.__dict__


def _held_as_parameters(member) -> bool:
    """Whether the member's weights are parameters of their modules. A parametrized weight
    (``torch.nn.utils.parametrize``) is computed anew at each access (its storage is no key), and it is refreshed
    layer by layer like a sharded one."""
    return "weight" in member.lora_A._parameters and "weight" in member.lora_B._parameters


@dataclass(slots=True)
class _Member:
    """One layer's adapter in the cache, with its ``lora_A`` / ``lora_B`` linear modules, looked up once: two module
    lookups per layer per step are a measurable share of a launch-bound step. Safe if peft ever replaced those
    modules: the layer's own forward checks its key against the weights it really uses and refreshes alone."""

    layer: torch.nn.Module
    name: str
    variant: object
    lora_A: torch.nn.Module
    lora_B: torch.nn.Module


class _Group:
    """Layers whose weights share shapes, dtypes, device, compute dtype and eta: refreshed in one batched call.

    The factors are written into two sets of stacked buffers, used in turn, whose per-layer views and entries are
    made once: a refresh then costs the batched operations and a key per layer, not new tensors, views and
    entries per layer per step. Two sets, so that a graph built before a refresh (saved ``c`` and ``[B | c B]``)
    still finds its values if its backward runs after it; a graph kept across two refreshes would see them
    overwritten, and autograd's check of saved tensors then raises instead of computing with the wrong ``c``.
    """

    __slots__ = ("cache", "members", "eta", "dtype", "stacked", "buffers", "entries", "turn", "_update")

    def __init__(self, cache, members: list, lora_A: torch.Tensor, lora_B: torch.Tensor, signature: tuple):
        self.cache = cache  # counts the refreshes
        self.members = members
        *_, self.dtype, self.eta = signature
        stacked_A = lora_A.expand(len(members), *lora_A.shape)  # shapes and dtypes of the stacks, for the buffers
        stacked_B = lora_B.expand(len(members), *lora_B.shape)
        self.stacked = (stacked_A.shape, stacked_B.shape, lora_A.dtype, lora_B.dtype)
        self.buffers = [FactorBuffers(stacked_A, stacked_B, self.dtype) for _ in range(2)]
        self._update = [None, None]  # per set of buffers, made at the first refresh that serves update scaling
        self.entries = [
            [_Entry(None, BackwardFactors(*views)) for views in zip(*(t.unbind() for t in buffers.factors()))]
            for buffers in self.buffers
        ]
        self.turn = 0

    @torch.no_grad()
    def refresh(self, weights: list[tuple[torch.Tensor, torch.Tensor, tuple]]) -> bool:
        """Compute the factors of ``weights`` (``(lora_A, lora_B, key)`` per member) into the next set of buffers."""
        return self._write([w[0] for w in weights], [w[1] for w in weights], [w[2] for w in weights])

    @torch.no_grad()
    def refresh_if_stale(self) -> bool:
        """The per-step path: refresh if any member is stale; False if the group no longer fits its members.

        Cheaper than grouping anew, as it runs once per step: no signature per member, and the shapes, dtypes and
        device are checked by stacking the weights. A member whose variant was removed or replaced since is still
        refreshed (wasted work, no harm) until the groups are next made.
        """
        members = self.members
        # ``_parameters`` directly: what ``module.weight`` returns, without nn.Module's __getattr__ (0.5 us a call)
        try:
            lora_As = [member.lora_A._parameters["weight"] for member in members]
            lora_Bs = [member.lora_B._parameters["weight"] for member in members]
        except KeyError:  # a weight that is not a parameter (a parametrization): the grouping walk handles it
            return False
        if not _WHOLE_TYPES.issuperset(map(type, lora_As)) or not _WHOLE_TYPES.issuperset(map(type, lora_Bs)):
            return False  # sharded since (FSDP2's DTensors); ZeRO-3's emptied weights fail the stacking below
        keys = [self.cache._key(lora_A, lora_B, self.dtype) for lora_A, lora_B in zip(lora_As, lora_Bs)]
        if not any(_is_stale(member.variant.cache_entry, key) for member, key in zip(members, keys)):
            return True
        return self._write(lora_As, lora_Bs, keys)

    def _write(self, lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], keys: list[tuple]) -> bool:
        """Compute the factors of the weights into the next set of buffers; False (nothing written) if they no longer
        fit the group's shapes, dtypes or device."""
        try:
            stacked_A, stacked_B = torch.stack(lora_As), torch.stack(lora_Bs)
        except RuntimeError:  # shapes or devices no longer match
            return False
        if (stacked_A.shape, stacked_B.shape, stacked_A.dtype, stacked_B.dtype) != self.stacked:
            return False
        self.turn = turn = 1 - self.turn
        buffers = self.buffers[turn]
        write_stacked_backward_factors(stacked_A, stacked_B, self.eta, self.dtype, out=buffers)
        updates = self._write_update_factors(turn) if self.cache.serves_update_scaling else [None] * len(keys)
        for member, key, entry, update in zip(self.members, keys, self.entries[turn], updates):
            entry.key, entry.update = key, update
            member.variant.cache_entry = entry
        self.cache.refreshes += 1
        return True

    def _write_update_factors(self, turn: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per member, ``c`` in B's dtype and its float32 mean in A's dtype: what ``allora_scale="update"`` divides the
        gradients by and puts on the update (:func:`applied_coefficient`), made for the whole group here (a mean
        and at most two casts) rather than layer by layer in the optimizer hooks: under bf16 autocast with float32
        adapters that would be a cast per layer per step."""
        buffers = self.buffers[turn]
        if self._update[turn] is None:
            (_, _, a_dtype, b_dtype), c = self.stacked, buffers.c
            means = torch.empty(c.shape[0], dtype=torch.float32, device=c.device)
            c_out = c if b_dtype == c.dtype else torch.empty_like(c, dtype=b_dtype)
            means_out = means if a_dtype == torch.float32 else torch.empty_like(means, dtype=a_dtype)
            self._update[turn] = (means, c_out, means_out, list(zip(c_out.unsqueeze(-1).unbind(), means_out.unbind())))
        means, c_out, means_out, views = self._update[turn]
        torch.mean(buffers.c, dim=1, dtype=torch.float32, out=means)
        if c_out is not buffers.c:
            c_out.copy_(buffers.c)  # exact: c is cast up (bf16 -> fp32), or to the weights' own dtype
        if means_out is not means:
            means_out.copy_(means)
        return views


class CoefficientCache:
    """The weight coefficients of one ALLoRA adapter's layers (one per :func:`~allora_trl.apply_allora` call).

    ``refreshes`` counts the batched and single-layer refreshes (for tests and benchmarks).
    ``serves_update_scaling``: the update hooks read it (``allora_scale="update"`` sets it): each batched refresh
    also keeps every layer's ``c`` and its mean in the weights' dtypes, and a ``torch.compile`` graph hands out the
    ``c`` it computes.
    """

    def __init__(self):
        self.members: list[_Member] = []
        self.sharded = False
        self.refreshes = 0
        self.serves_update_scaling = False
        self._groups: dict[tuple, _Group] = {}  # by signature; made at the first batched refresh that needs one
        self._groups_state = None  # (autocast dtype, inference mode) the groups were made under

    def __getstate__(self):
        return {**self.__dict__, "_groups": {}, "_groups_state": None}  # a copy makes its own buffers

    def add(self, layer: torch.nn.Module, adapter_name: str, variant) -> None:
        self.members.append(
            _Member(layer, adapter_name, variant, layer.lora_A[adapter_name], layer.lora_B[adapter_name])
        )
        self._groups_state = None
        if not getattr(layer, "_allora_watches_loads", False):
            layer.register_load_state_dict_post_hook(_forget_layer_entries)
            layer._allora_watches_loads = True

    def _key(self, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> tuple:
        if self.sharded:
            return (_optimizer_steps, dtype, torch.is_inference_mode_enabled(), lora_A._version, lora_B._version)
        return (
            _optimizer_steps,
            dtype,
            torch.is_inference_mode_enabled(),
            lora_A._version,
            lora_B._version,
            lora_A.data_ptr(),
            lora_B.data_ptr(),
        )

    def factors(self, variant, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> BackwardFactors:
        """The factors for these weights in ``dtype``: cached, or refreshed now (with every stale layer if whole)."""
        key = self._key(lora_A, lora_B, dtype)
        if not _is_stale(variant.cache_entry, key):
            return variant.cache_entry.factors
        if not self.sharded:
            self._refresh_all(lora_A.device.type)
            key = self._key(lora_A, lora_B, dtype)  # without the storage, if the walk found sharded weights
        if _is_stale(variant.cache_entry, key):  # sharded, or not a member (a copied variant): this layer alone
            self._refresh_alone(variant, lora_A, lora_B, dtype, key)
        return variant.cache_entry.factors

    def _refresh_all(self, device_type: str) -> None:
        """Refresh every group of whole weights that has a stale member, batched; note when some are sharded.

        Each member's compute dtype is read from the autocast state of ``device_type`` (the asking layer's): a
        member on another kind of device that gets it wrong is refreshed again, alone, at its own forward.
        """
        autocast = autocast_dtype(device_type)
        inference = torch.is_inference_mode_enabled()  # tensors made in inference mode are kept apart
        state = (autocast, inference)
        if state == self._groups_state and all(group.refresh_if_stale() for group in self._groups.values()):
            return  # the usual step: the groups still fit, each refreshed in place
        by_signature: dict[tuple, list] = {}
        for member in self.members:
            if member.layer.lora_variant.get(member.name) is not member.variant:
                continue  # replaced or removed since
            lora_A, lora_B = member.lora_A.weight, member.lora_B.weight
            if _is_sharded(lora_A) or _is_sharded(lora_B) or not _held_as_parameters(member):
                self.sharded = True
                self._groups, self._groups_state = {}, None
                return
            dtype = autocast or lora_A.dtype
            eta = member.variant.eta
            signature = (lora_A.shape, lora_B.shape, lora_A.dtype, lora_B.dtype, lora_A.device, inference, dtype, eta)
            by_signature.setdefault(signature, []).append((member, lora_A, lora_B, self._key(lora_A, lora_B, dtype)))
        groups = {}
        for signature, items in by_signature.items():
            members = [member for member, *_ in items]
            group = self._groups.get(signature)
            if group is None or group.members != members:
                group = _Group(self, members, items[0][1], items[0][2], signature)
            groups[signature] = group
            if any(_is_stale(member.variant.cache_entry, key) for member, *_, key in items):
                group.refresh([item[1:] for item in items])
        self._groups, self._groups_state = groups, state

    @torch.no_grad()
    def _refresh_alone(self, variant, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype, key) -> None:
        """One layer's factors, in new tensors: sharded weights (inside the layer's forward), a copied variant, or a
        member its group no longer describes (its dtype changed alone, say): the groups are then made anew."""
        self._groups_state = None
        factors = stacked_backward_factors(lora_A[None], lora_B[None], variant.eta, dtype)
        variant.cache_entry = _Entry(key, BackwardFactors(*(tensor[0] for tensor in factors)))
        self.refreshes += 1

    def clear(self) -> None:
        """Forget every entry: the next forward recomputes them."""
        for member in self.members:
            member.variant.cache_entry = None
        self.sharded = False


def applied_coefficient(variant, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c`` as the layer's last backward applied it, (n_out, 1), and its mean (taken in float32): what
    ``allora_scale="update"`` divides out of the gradients and puts on the update, so both see one coefficient.
    ``c`` comes in ``lora_B``'s dtype and the mean in ``lora_A``'s (the gradients' dtypes), cast from the compute
    dtype ``c`` was applied in.

    From the cache if its entry was made since the last optimizer step (the one this step's forward passes used);
    else the one a ``torch.compile`` graph computed in its last forward (the graph hands it out); else (no forward
    since the last step) computed now, in the dtype of the last entry. Runs for every layer before every step, so
    the entry's step count is checked, not its whole key.
    """
    entry, cache = variant.cache_entry, variant.cache
    if entry is not None and entry.key[0] == _optimizer_steps:  # key[0]: the step count (CoefficientCache._key)
        if entry.update is not None:  # kept by a batched refresh
            return entry.update
        coefficient = entry.factors.coefficient
    elif variant.traced_applied is not None:
        return variant.traced_applied
    else:
        dtype = lora_A.dtype if entry is None else entry.factors.coefficient.dtype
        coefficient = cache.factors(variant, lora_A, lora_B, dtype).coefficient
    return _update_factors(coefficient, lora_A.dtype, lora_B.dtype)


def _update_factors(coefficient: torch.Tensor, a_dtype: torch.dtype, b_dtype: torch.dtype):
    """``c`` cast to B's dtype and its float32 mean cast to A's: the factors of :func:`applied_coefficient`."""
    mean = coefficient.mean(dtype=torch.float32)
    return coefficient.to(b_dtype), mean.to(a_dtype)


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
        factors = traced_backward_factors(lora_A, lora_B, variant.eta, dtype)
        if variant.cache.serves_update_scaling:  # for applied_coefficient: c and its mean become graph outputs
            variant.traced_applied = _update_factors(factors.coefficient, lora_A.dtype, lora_B.dtype)
        return factors
    return variant.cache.factors(variant, lora_A, lora_B, dtype)


def backward_factors(layer: torch.nn.Module, adapter_name: str, dtype: torch.dtype) -> BackwardFactors | None:
    """The :class:`BackwardFactors` of ``layer``'s adapter ``adapter_name`` in ``dtype``, or None if that adapter
    has no ALLoRA variant with the weight coefficient. For code that computes the LoRA branch itself (fused
    kernels): call it in forward and save the tensors for backward."""
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if getattr(variant, "cache", None) is None or variant.coefficient != "weight":
        return None
    return backward_factors_for(variant, layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, dtype)
