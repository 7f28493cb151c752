"""``ALLoRATrainer`` / ``ALLoRAConfig``: TRL's ``SFTTrainer`` / ``SFTConfig`` with ALLoRA on the LoRA layers (see
:mod:`allora_trl.trainers.mixin`)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin, default_lora_config

__all__ = ["ALLoRAConfig", "ALLoRATrainer", "default_lora_config"]


@dataclass
class ALLoRAConfig(ALLoRAArguments, SFTConfig):
    """Configuration for :class:`~allora_trl.ALLoRATrainer`: every ``SFTConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults.

    Example:

    ```python
    >>> from allora_trl import ALLoRAConfig
    >>> args = ALLoRAConfig(output_dir="out", allora_eta=2.0, learning_rate=4e-4)
    >>> (args.allora_eta, args.allora_coefficient, args.allora_scale)
    (2.0, 'weight', 'gradient')
    ```
    """


class ALLoRATrainer(ALLoRATrainerMixin, SFTTrainer):
    """A drop-in ``SFTTrainer`` that trains LoRA adapters with the ALLoRA gradient rule (arXiv 2410.09692).

    Takes exactly ``SFTTrainer``'s arguments. ALLoRA's settings come from ``args`` (an :class:`ALLoRAConfig`; other
    ``TrainingArguments`` are converted). With no ``peft_config`` and a model that is not a peft model it trains
    :func:`default_lora_config` (r=16, all linear layers).

    Example:

    ```python
    from datasets import load_dataset
    from allora_trl import ALLoRAConfig, ALLoRATrainer

    trainer = ALLoRATrainer(
        model="path/to/model",
        args=ALLoRAConfig(output_dir="out", allora_eta=2.0),
        train_dataset=load_dataset("json", data_files="train.jsonl", split="train"),  # prompt/completion rows
    )
    trainer.train()
    trainer.save_model()  # plain LoRA adapter + allora_config.json + a model card naming ALLoRA
    ```
    """

    config_class = ALLoRAConfig
    default_output_suffix = ""  # <model>-ALLoRA, as SFTTrainer's <model>-SFT; the others add their TRL name
