"""``ALLoRAKTOTrainer`` / ``ALLoRAKTOConfig``: TRL's ``KTOTrainer`` / ``KTOConfig`` with ALLoRA on the LoRA layers.

Reference model: as for DPO (the adapter disabled for a new adapter, or a frozen ``ref`` copy of a trained one; never given the ALLoRA rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import KTOConfig, KTOTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin


@dataclass
class ALLoRAKTOConfig(ALLoRAArguments, KTOConfig):
    """Configuration for :class:`ALLoRAKTOTrainer`: every ``KTOConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults."""


class ALLoRAKTOTrainer(ALLoRATrainerMixin, KTOTrainer):
    """A drop-in ``KTOTrainer`` that trains its LoRA adapter with the ALLoRA rule (arXiv 2410.09692).

    Takes exactly ``KTOTrainer``'s arguments; other ``TrainingArguments`` are converted to :class:`ALLoRAKTOConfig`.

    Example:

    ```python
    from allora_trl import ALLoRAKTOConfig, ALLoRAKTOTrainer

    trainer = ALLoRAKTOTrainer(
        model="path/to/model",
        args=ALLoRAKTOConfig(output_dir="out", allora_eta=2.0),
        train_dataset=dataset,  # prompt/completion/label rows, as for KTOTrainer
    )
    trainer.train()
    ```
    """

    config_class = ALLoRAKTOConfig
