"""``ALLoRARLOOTrainer`` / ``ALLoRARLOOConfig``: TRL's ``RLOOTrainer`` / ``RLOOConfig`` with ALLoRA on the LoRA layers.

Reference model: as for GRPO (none at ``beta=0``; else the disabled or frozen ``ref`` adapter, never given the ALLoRA rule). ``use_vllm=True`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import RLOOConfig, RLOOTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin


@dataclass
class ALLoRARLOOConfig(ALLoRAArguments, RLOOConfig):
    """Configuration for :class:`ALLoRARLOOTrainer`: every ``RLOOConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults."""


class ALLoRARLOOTrainer(ALLoRATrainerMixin, RLOOTrainer):
    """A drop-in ``RLOOTrainer`` that trains its LoRA adapter with the ALLoRA rule (arXiv 2410.09692).

    Takes exactly ``RLOOTrainer``'s arguments; other ``TrainingArguments`` are converted to :class:`ALLoRARLOOConfig`.

    Example:

    ```python
    from allora_trl import ALLoRARLOOConfig, ALLoRARLOOTrainer

    trainer = ALLoRARLOOTrainer(
        model="path/to/model", reward_funcs=my_reward,
        args=ALLoRARLOOConfig(output_dir="out", allora_eta=2.0),
        train_dataset=dataset,  # prompt rows, as for RLOOTrainer
    )
    trainer.train()
    ```
    """

    config_class = ALLoRARLOOConfig
