"""allora-trl: ALLoRA (Huang & Balestriero, arXiv 2410.09692) for TRL, Axolotl and Accelerate.

``apply_allora`` installs the ALLoRA gradient rule on a peft LoRA model; ``ALLoRATrainer`` / ``ALLoRAConfig`` are
drop-in replacements for TRL's ``SFTTrainer`` / ``SFTConfig``, and ``ALLoRA{DPO,GRPO,KTO,RLOO,Reward}Trainer`` /
``...Config`` for TRL's other trainers.
"""

from .core.gradient import allora_lora_forward, lora_row_norms, weight_coefficient
from .core.model import (
    allora_settings,
    apply_allora,
    load_allora_adapter,
    normalize_lora_config,
    save_allora_adapter,
    write_allora_configs,
)
from .core.settings import ALLORA_CONFIG_NAME, ALLoRASettings, read_allora_config
from .core.stats import collect_allora_stats, set_allora_stats_recording

__version__ = "0.1.0"

# Trainers and configs are imported on first use, so that importing the package (e.g. from the Axolotl plugin) does
# not import TRL's trainers: name -> module under allora_trl.trainers.
_TRAINERS = {
    "ALLoRAArguments": "config",
    "ALLoRAConfig": "sft",
    "ALLoRATrainer": "sft",
    "ALLoRATrainerMixin": "mixin",
    **{
        f"ALLoRA{name}{kind}": module
        for name, module in (("DPO", "dpo"), ("GRPO", "grpo"), ("KTO", "kto"), ("RLOO", "rloo"), ("Reward", "reward"))
        for kind in ("Config", "Trainer")
    },
}

__all__ = [
    "ALLORA_CONFIG_NAME",
    "ALLoRASettings",
    "allora_lora_forward",
    "allora_settings",
    "apply_allora",
    "collect_allora_stats",
    "load_allora_adapter",
    "lora_row_norms",
    "normalize_lora_config",
    "read_allora_config",
    "save_allora_adapter",
    "set_allora_stats_recording",
    "weight_coefficient",
    "write_allora_configs",
    *sorted(_TRAINERS),
]


def __getattr__(name):
    module = _TRAINERS.get(name)
    if module is None:
        raise AttributeError(f"module 'allora_trl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".trainers.{module}", __name__), name)
