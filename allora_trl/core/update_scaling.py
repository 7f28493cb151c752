"""``allora_scale="update"``: the ALLoRA coefficient applied to the optimizer's *update*, not to the gradient.

This is allora-trl's own extension, not part of the paper. Why: ALLoRA (arXiv 2410.09692) scales the gradient of
row i of ``B`` by ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)``. Under SGD that scales the step of row i by ``c_i``, so at
``B = 0`` the effective learning rate is ``eta`` times the base one, as the paper says. Adam, however, divides each
gradient entry by a running estimate of its own magnitude: a per-row factor that changes slowly is divided out
again, and the rule is (almost) the same as LoRA with ``alpha = r`` and no dropout. ``update`` restores the intended
effect under any optimizer by rescaling what the optimizer does:

What is scaled, exactly (``c`` is the paper's per-row coefficient computed from the weights *before* the step,
i.e. the weights the gradients were computed at):

* ``B`` (n_out x r): the optimizer sees the **plain LoRA gradient** (the ALLoRA factor ``c_i`` that the backward
  pass applied is divided out again before the step, so it is not applied twice), and the change the optimizer
  makes to row i, weight decay included, is multiplied by ``c_i``.
* ``A`` (r x n_in): the gradient keeps the ALLoRA rule's weighting of output rows, normalised to mean 1: the
  optimizer sees ``grad_A(c) / mean(c)``. The change the optimizer makes to ``A`` is multiplied by ``mean(c)``.

Consequences: at ``B = 0`` (``c == eta`` everywhere) one step of any optimizer moves ``B`` by exactly ``eta`` times
that optimizer's plain step (Adam: ``eta * lr * m/(sqrt(v)+eps)``), i.e. the effective learning rate is
``eta x lr`` as intended. Under plain SGD without momentum ``update`` is identical to the paper's ``gradient``
rule (``c_i * lr * g_B`` for B, ``mean(c) * lr * grad_A(c)/mean(c) = lr * grad_A(c)`` for A); with momentum they
differ only through how ``c`` changes between steps.

Mechanics: an optimizer step pre-hook divides the factors out of the gradients and keeps a copy of ``A`` and ``B``;
a step post-hook rescales the change ``p_new - p_old``. Only ``coefficient="weight"`` can be used (the per-token
``"output"`` coefficient cannot be divided out of a summed gradient). Gradient clipping, which the Trainer applies
before the step, sees the ALLoRA-scaled gradients. It needs each process to hold whole ``A`` and ``B`` matrices:
single process and DDP, not FSDP or DeepSpeed ZeRO-3 (sharded parameters are rejected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coefficient_cache import applied_coefficient
from .model import iter_lora_layers
from .variant import ALLoRALinearVariant


@dataclass
class _Pair:
    """One ALLoRA adapter of one layer: its two weights and its eta."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    variant: ALLoRALinearVariant


def _allora_pairs(model: torch.nn.Module, optimized: set[int]) -> list[_Pair]:
    """The ALLoRA (A, B) pairs of ``model`` whose weights are among the ``optimized`` parameter ids."""
    pairs = []
    for layer_name, layer in iter_lora_layers(model):
        for name, variant in layer.lora_variant.items():
            if not isinstance(variant, ALLoRALinearVariant):
                continue
            if id(layer.lora_A[name].weight) not in optimized and id(layer.lora_B[name].weight) not in optimized:
                continue
            if variant.coefficient != "weight":
                raise ValueError(
                    f"allora_scale='update' needs allora_coefficient='weight'; layer {layer_name!r} adapter {name!r} "
                    f"uses {variant.coefficient!r} (a per-token coefficient cannot be moved to the update)."
                )
            pair = _Pair(layer.lora_A[name].weight, layer.lora_B[name].weight, variant)
            for param in (pair.lora_A, pair.lora_B):
                if type(param.data) is not torch.Tensor or param.dim() != 2:
                    raise ValueError(
                        "allora_scale='update' needs whole (unsharded) LoRA weights in each process: use a single "
                        f"process or DDP, not FSDP / DeepSpeed ZeRO-3 (layer {layer_name!r} has a "
                        f"{type(param.data).__name__} of shape {tuple(param.shape)})."
                    )
            pairs.append(pair)
    return pairs


class UpdateScaling:
    """Optimizer hooks that move the ALLoRA coefficient from the gradient to the update (see module docstring).

    Build it with :func:`enable_update_scaling`; ``remove()`` detaches the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.pairs = _allora_pairs(model, optimized)
        if not self.pairs:
            raise ValueError(
                "allora_scale='update' found no ALLoRA layers whose weights this optimizer updates: call "
                "apply_allora (or use ALLoRATrainer) before enabling update scaling."
            )
        self.optimizer = optimizer
        self._pending: tuple[list, list, list] | None = None  # (weights, their copies before the step, factors)
        self._copies: list[torch.Tensor] = []  # where the weights are copied before each step, made once
        self._copied: tuple = ()  # what those copies were made for: the weights' ids and storage addresses
        self.variants: list[ALLoRALinearVariant] = []  # those enable_update_scaling recorded scale "update" on
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        """Divide the factors out of the gradients and keep the weights before the step.

        With ``foreach`` operations over every weight at once, the means of ``c`` kept by the cache's batched refresh
        and the copies made into tensors kept from step to step: a fixed number of calls per step, not some per layer.
        """
        weights, grads, factors = [], [], []
        for pair in self.pairs:
            grad_A, grad_B = pair.lora_A.grad, pair.lora_B.grad
            if grad_A is None and grad_B is None:
                continue
            # c (n_out, 1), the one the backward applied, and its mean, in the weights' dtypes: from the step's cache
            c, mean = applied_coefficient(pair.variant, pair.lora_A, pair.lora_B)
            if grad_B is not None:  # back to the plain LoRA gradient: c goes on the update
                weights.append(pair.lora_B)
                grads.append(grad_B)
                factors.append(c if c.dtype == grad_B.dtype else c.to(grad_B.dtype))
            if grad_A is not None:  # keep the rule's row weighting, at mean 1
                weights.append(pair.lora_A)
                grads.append(grad_A)
                factors.append(mean if mean.dtype == grad_A.dtype else mean.to(grad_A.dtype))
        if not weights:
            self._pending = None
            return
        torch._foreach_div_(grads, factors)
        # the copies are made again only for other weights than last step's (a frozen adapter, a cast or a move
        # gives new storage): ids and storage addresses, read without a Python call per weight
        copied = (list(map(id, weights)), list(map(torch.Tensor.data_ptr, weights)))
        if copied != self._copied:
            self._copies, self._copied = [torch.empty_like(weight) for weight in weights], copied
        torch._foreach_copy_(self._copies, weights)  # exact copies, into tensors made once (no allocation per step)
        self._pending = (weights, self._copies, factors)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        """Rescale the step: ``p <- old + factor * (p - old)`` (B row by row by c, A by mean(c)): a lerp from the
        copies towards the new weights, then copied back (two passes, not subtract, multiply and add)."""
        if self._pending is not None:
            weights, old, factors = self._pending
            torch._foreach_lerp_(old, weights, factors)
            torch._foreach_copy_(weights, old)
        self._pending = None

    def remove(self) -> None:
        """Detach the hooks: the optimizer behaves as before, and the layers record ``scale="gradient"`` again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._copies, self._copied = [], ()
        for variant in self.variants:
            variant.scale = "gradient"
            variant.traced_applied = None
            if variant.cache is not None:
                variant.cache.serves_update_scaling = False


def enable_update_scaling(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> UpdateScaling:
    """Register the ``allora_scale="update"`` hooks on ``optimizer`` for every ALLoRA layer of ``model``.

    ``model`` must already have ALLoRA installed (``apply_allora``); ``optimizer`` must be the optimizer whose
    ``step`` updates the LoRA weights (an Accelerate-wrapped optimizer's inner ``.optimizer`` also works: hooks
    registered on it fire when the wrapper steps). Records ``scale="update"`` on the ALLoRA layers it wires, and only
    on those, so that :func:`~allora_trl.core.model.allora_settings` and ``allora_config.json`` say ``"update"``
    exactly while the hooks run (``remove()`` records ``"gradient"`` again).

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer that steps the LoRA weights.
        model (`torch.nn.Module`): the peft model with ALLoRA installed.

    Returns:
        `UpdateScaling`: the handle; keep it to ``remove()`` the hooks.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # Accelerate's wrapper steps the inner optimizer, whose hooks then fire
    scaling = UpdateScaling(optimizer, model)
    wired = {id(p) for pair in scaling.pairs for p in (pair.lora_A, pair.lora_B)}
    scaling.variants = [
        variant
        for _, layer in iter_lora_layers(model)
        for name, variant in layer.lora_variant.items()
        if isinstance(variant, ALLoRALinearVariant)
        and {id(layer.lora_A[name].weight), id(layer.lora_B[name].weight)} & wired
    ]
    for variant in scaling.variants:
        variant.scale = "update"
        if variant.cache is not None:
            variant.cache.serves_update_scaling = True  # c and its mean kept by the refresh, or handed out by a graph
    return scaling
