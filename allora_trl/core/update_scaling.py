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

    Build it with :func:`enable_update_scaling`; ``remove()`` detaches the hooks. ``last_mean_scale`` is the mean
    of ``c`` over all rows of all layers at the last step (a float tensor, no host sync).
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
        self._pending: list[tuple[list, list, list]] = []  # (weights, their copies, factors) for B, then A
        self.last_mean_scale: torch.Tensor | None = None
        self.variants: list[ALLoRALinearVariant] = []  # those enable_update_scaling recorded scale "update" on
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        """Divide the factors out of the gradients and keep the weights before the step.

        With ``foreach`` operations over every pair at once: one call per operation, not one per layer.
        """
        pairs = [pair for pair in self.pairs if pair.lora_A.grad is not None or pair.lora_B.grad is not None]
        # float32 (n_out,): the c the backward pass applied, from the per-step cache
        cs = [applied_coefficient(pair.variant, pair.lora_A, pair.lora_B) for pair in pairs]
        self.last_mean_scale = torch.cat(cs).mean() if cs else None
        with_B = [i for i, pair in enumerate(pairs) if pair.lora_B.grad is not None]
        with_A = [i for i, pair in enumerate(pairs) if pair.lora_A.grad is not None]
        B = [pairs[i].lora_B for i in with_B]
        A = [pairs[i].lora_A for i in with_A]
        c_rows = [cs[i][:, None].to(pairs[i].lora_B.grad.dtype) for i in with_B]
        c_means = [cs[i].mean().to(pairs[i].lora_A.grad.dtype) for i in with_A]
        if B:
            torch._foreach_div_([p.grad for p in B], c_rows)  # back to the plain LoRA gradient: c goes on the update
        if A:
            torch._foreach_div_([p.grad for p in A], c_means)  # keep the rule's row weighting, at mean 1
        old_B = torch._foreach_mul(B, 1.0) if B else []  # exact copies of the weights before the step
        old_A = torch._foreach_mul(A, 1.0) if A else []
        self._pending = [(B, old_B, c_rows), (A, old_A, c_means)]

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        """Rescale the step: ``p <- old + factor * (p - old)`` (B row by row by c, A by mean(c))."""
        for params, old, factors in self._pending:
            if params:
                torch._foreach_sub_(params, old)
                torch._foreach_mul_(params, factors)
                torch._foreach_add_(params, old)
        self._pending = []

    def remove(self) -> None:
        """Detach the hooks: the optimizer behaves as before, and the layers record ``scale="gradient"`` again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for variant in self.variants:
            variant.scale = "gradient"


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
    return scaling
