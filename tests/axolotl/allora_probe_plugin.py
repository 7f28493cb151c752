"""A test-only Axolotl plugin that records what the model looked like *during* training, for the end-to-end tests.

``axolotl train`` runs in a subprocess, so the tests cannot look at the live model; this plugin (listed under
``plugins:`` after the ALLoRA plugin, importable through ``PYTHONPATH``) writes ``probe.json`` into ``output_dir``
at the end of the first optimizer step: the classes of the LoRA layers' base layers (bitsandbytes ``Linear4bit``
for QLoRA), which adapters carry the ALLoRA rule, the trainer class and its reference model.
"""

from __future__ import annotations

import json
import os

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from allora_trl.core.model import iter_lora_layers
from allora_trl.core.variant import ALLoRALinearVariant

PROBE_FILE = "probe.json"


def describe(trainer) -> dict:
    model = trainer.model
    adapters: dict[str, dict[str, int]] = {}
    base_types = set()
    for _, layer in iter_lora_layers(model):
        base = layer.get_base_layer()
        base_types.add(f"{type(base).__module__}.{type(base).__name__}")
        for name in layer.lora_A:
            entry = adapters.setdefault(name, {"lora_layers": 0, "allora_layers": 0, "trainable": 0})
            entry["lora_layers"] += 1
            entry["allora_layers"] += isinstance(layer.lora_variant.get(name), ALLoRALinearVariant)
            entry["trainable"] += layer.lora_B[name].weight.requires_grad
    ref = getattr(trainer, "ref_model", None)
    method = getattr(model, "quantization_method", None)
    return {
        "trainer": type(trainer).__name__,
        "trainer_mro": [cls.__name__ for cls in type(trainer).__mro__],
        "ref_model": None if ref is None else type(ref).__name__,
        "active_adapter": getattr(model, "active_adapter", None),
        "adapters": adapters,
        "base_layer_types": sorted(base_types),
        "quantization_method": str(getattr(method, "value", method) or ""),
    }


class _ProbeCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and state.is_world_process_zero:
            with open(os.path.join(args.output_dir, PROBE_FILE), "w") as f:
                json.dump(describe(self.trainer), f, indent=1)


class ProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        return [_ProbeCallback(trainer)]
