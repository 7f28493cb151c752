"""allora-trl: ALLoRA (Huang & Balestriero, arXiv 2410.09692) for TRL, Axolotl and Accelerate.

``apply_allora`` installs the ALLoRA gradient rule on a peft LoRA model; ``ALLoRATrainer`` / ``ALLoRAConfig`` are
drop-in replacements for TRL's ``SFTTrainer`` / ``SFTConfig``. The trainer is imported lazily so that importing
the package (e.g. from the Axolotl plugin) does not import TRL.
"""

from .core.gradient import allora_lora_forward, lora_row_norms, weight_coefficient
from .core.model import (
    ALLORA_CONFIG_NAME,
    ALLoRASettings,
    allora_settings,
    apply_allora,
    load_allora_adapter,
    normalize_lora_config,
    read_allora_config,
    save_allora_adapter,
    write_allora_configs,
)
from .core.stats import collect_allora_stats, set_allora_stats_recording

__version__ = "0.1.0"

__all__ = [
    "ALLORA_CONFIG_NAME",
    "ALLoRAConfig",
    "ALLoRASettings",
    "ALLoRATrainer",
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
]


def __getattr__(name):
    if name == "ALLoRAConfig":
        from .trainers.config import ALLoRAConfig

        return ALLoRAConfig
    if name == "ALLoRATrainer":
        from .trainers.sft import ALLoRATrainer

        return ALLoRATrainer
    raise AttributeError(f"module 'allora_trl' has no attribute {name!r}")
