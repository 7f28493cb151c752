"""``ALLoRARewardTrainer`` / ``ALLoRARewardConfig``: TRL's ``RewardTrainer`` / ``RewardConfig`` with ALLoRA on the LoRA layers.

No reference model. The score head TRL adds to the sequence-classification model is trained as peft's ``modules_to_save`` (a plain parameter, not LoRA): ALLoRA's rule applies to the LoRA layers only. Without a ``peft_config`` the default LoRA is a sequence-classification one (``task_type="SEQ_CLS"``: r=16 on all linear layers but the head, the ``score`` head trained whole).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import RewardConfig, RewardTrainer

from .config import ALLoRAArguments
from .mixin import ALLoRATrainerMixin


@dataclass
class ALLoRARewardConfig(ALLoRAArguments, RewardConfig):
    """Configuration for :class:`ALLoRARewardTrainer`: every ``RewardConfig`` field plus :class:`ALLoRAArguments`
    (``allora_eta``, ``allora_coefficient``, ``allora_scale``), with CPU-friendly defaults."""


class ALLoRARewardTrainer(ALLoRATrainerMixin, RewardTrainer):
    """A drop-in ``RewardTrainer`` that trains its LoRA adapter with the ALLoRA rule (arXiv 2410.09692).

    Takes exactly ``RewardTrainer``'s arguments; other ``TrainingArguments`` are converted to :class:`ALLoRARewardConfig`.
    With no ``peft_config`` and a model that is not a peft model it trains ``default_lora_config("SEQ_CLS")``: r=16 on
    all linear layers but the ``score`` head, which peft trains whole (``modules_to_save``).

    Example:

    ```python
    from allora_trl import ALLoRARewardConfig, ALLoRARewardTrainer

    trainer = ALLoRARewardTrainer(
        model="path/to/model",
        args=ALLoRARewardConfig(output_dir="out", allora_eta=2.0),
        train_dataset=dataset,  # prompt/chosen/rejected rows, as for RewardTrainer
    )
    trainer.train()
    ```
    """

    config_class = ALLoRARewardConfig
    default_task_type = "SEQ_CLS"
