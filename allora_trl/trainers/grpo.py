"""``ALLoRAGRPOTrainer`` / ``ALLoRAGRPOConfig``: TRL's ``GRPOTrainer`` / ``GRPOConfig`` with ALLoRA on the LoRA layers.

Reference model: none with TRL's default ``beta=0.0``; with ``beta > 0`` the adapter disabled (new adapter) or a frozen ``ref`` copy (trained adapter), never given the ALLoRA rule. ``use_vllm=True`` is refused (untested with ALLoRA adapters): completions are generated with transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin


@dataclass
class ALLoRAGRPOConfig(ALLoRAArguments, GRPOConfig):
    """Configuration for :class:`ALLoRAGRPOTrainer`: every ``GRPOConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults."""


class ALLoRAGRPOTrainer(ALLoRATrainerMixin, GRPOTrainer):
    """A drop-in ``GRPOTrainer`` that trains its LoRA adapter with the ALLoRA rule (arXiv 2410.09692).

    Takes exactly ``GRPOTrainer``'s arguments; other ``TrainingArguments`` are converted to :class:`ALLoRAGRPOConfig`.

    Example:

    ```python
    from allora_trl import ALLoRAGRPOConfig, ALLoRAGRPOTrainer

    trainer = ALLoRAGRPOTrainer(
        model="path/to/model", reward_funcs=my_reward,
        args=ALLoRAGRPOConfig(output_dir="out", allora_eta=2.0),
        train_dataset=dataset,  # prompt rows, as for GRPOTrainer
    )
    trainer.train()
    ```
    """

    config_class = ALLoRAGRPOConfig
