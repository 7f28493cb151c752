"""``ALLoRADPOTrainer`` / ``ALLoRADPOConfig``: TRL's ``DPOTrainer`` / ``DPOConfig`` with ALLoRA on the LoRA layers.

Reference model: with a ``peft_config`` (a new adapter), the reference is the base model with the adapter disabled, equal to the starting policy since B = 0. With a peft model carrying a trained adapter, TRL adds a frozen copy named ``ref``: it is never given the ALLoRA rule. A separate ``ref_model`` is used as given.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin


@dataclass
class ALLoRADPOConfig(ALLoRAArguments, DPOConfig):
    """Configuration for :class:`ALLoRADPOTrainer`: every ``DPOConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults."""


class ALLoRADPOTrainer(ALLoRATrainerMixin, DPOTrainer):
    """A drop-in ``DPOTrainer`` that trains its LoRA adapter with the ALLoRA rule (arXiv 2410.09692).

    Takes exactly ``DPOTrainer``'s arguments; other ``TrainingArguments`` are converted to :class:`ALLoRADPOConfig`.

    Example:

    ```python
    from allora_trl import ALLoRADPOConfig, ALLoRADPOTrainer

    trainer = ALLoRADPOTrainer(
        model="path/to/model",
        args=ALLoRADPOConfig(output_dir="out", allora_eta=2.0),
        train_dataset=dataset,  # prompt/chosen/rejected rows, as for DPOTrainer
    )
    trainer.train()
    ```
    """

    config_class = ALLoRADPOConfig
