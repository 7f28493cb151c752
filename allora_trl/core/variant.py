"""ALLoRA as a peft LoRA variant: the rule runs inside each LoRA layer's own forward/backward.

peft dispatches a LoRA layer's forward, merge and unmerge to ``layer.lora_variant[adapter_name]`` when one is set
(that is how DoRA is built). Installing the rule there, rather than in the optimizer, means every layer sees its
full weights in forward and backward, so the rule is identical under gradient accumulation, gradient
checkpointing, DDP, FSDP1/FSDP2 and DeepSpeed ZeRO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant

from .coefficient_cache import CoefficientCache, backward_factors_for
from .gradient import CoefficientStats, allora_lora_forward, autocast_dtype, weight_rule


class ALLoRALinearVariant(LoraVariant):
    """Forward ``result + B A x`` (scaling 1, no dropout) with the ALLoRA backward; merges like LoRA at scaling 1.

    Unlike peft's own variants, which are stateless, an instance carries its settings (``eta``, ``coefficient``,
    ``scale``), the layer's coefficient statistics and its entry in the adapter's
    :class:`~allora_trl.core.coefficient_cache.CoefficientCache` (the weight coefficient, once per optimizer step),
    so one model can hold ALLoRA adapters with different settings and :func:`~allora_trl.core.model.allora_settings`
    can read back what the model was trained with. ``scale`` is a record only: the variant always applies the
    gradient rule; ``"update"`` is carried out by optimizer hooks (:mod:`allora_trl.core.update_scaling`) that the
    trainer installs.
    """

    def __init__(self, eta: float, coefficient: str, scale: str = "gradient", cache: CoefficientCache | None = None):
        self.eta = eta
        self.coefficient = coefficient
        self.scale = scale
        self.stats = CoefficientStats()
        self.cache = cache  # shared by the adapter's layers: the weight coefficient once per optimizer step
        self.cache_entry = None
        self.traced_applied = None  # (c, its mean) of the last forward run in a torch.compile graph (its outputs)

    def __getstate__(self):
        # a copy (TRL's reference models are deep copies) recomputes its own coefficient
        return {k: v for k, v in self.__dict__.items() if k not in ("cache_entry", "traced_applied")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cache_entry = None
        self.traced_applied = None

    def supports_lora_conversion(self) -> bool:
        return True  # an ALLoRA adapter *is* a LoRA adapter with alpha == r

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass  # no extra parameters: A and B are LoRA's own

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter)
        return orig_weight + delta.to(device=orig_weight.device, dtype=orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        delta = module.get_delta_weight(active_adapter)
        orig_weight.data += delta.to(device=orig_weight.device, dtype=orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter)
        return orig_weight.data - delta.to(device=orig_weight.device, dtype=orig_weight.dtype)

    def forward(self, module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = _lora_weights(module, active_adapter)
        if not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)):
            # no backward will run (evaluation, generation, a frozen adapter): plain LoRA at scaling 1
            return result + F.linear(F.linear(x, lora_A), lora_B).to(result.dtype)
        if self.coefficient != "weight" or self.cache is None:
            lora_output = allora_lora_forward(
                x, lora_A, lora_B, eta=self.eta, coefficient=self.coefficient, stats=self.stats
            )
        else:  # the weight coefficient of this optimizer step, from the adapter's cache
            autocast = autocast_dtype(x.device.type)
            factors = backward_factors_for(self, lora_A, lora_B, autocast or lora_A.dtype)
            if self.stats.enabled:
                self.stats.record(factors.coefficient, factors.row_norms)
            lora_output = weight_rule(x, lora_A, lora_B, factors, autocast)
        if lora_output.dtype != result.dtype:
            lora_output = lora_output.to(result.dtype)
        return result + lora_output


def _lora_weights(module: torch.nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``module.lora_A[adapter_name].weight`` and ``module.lora_B[adapter_name].weight``, read from the modules' own
    dicts: the same tensors without ``nn.Module``'s and ``ModuleDict``'s Python lookups (about 2.5 us a layer, a
    share of a step bound by launching operations)."""
    modules = module._modules
    try:
        return (
            modules["lora_A"]._modules[adapter_name]._parameters["weight"],
            modules["lora_B"]._modules[adapter_name]._parameters["weight"],
        )
    except KeyError:  # not held as plain parameters (a parametrization, say): the usual lookups
        return module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
