"""ALLoRA's training settings (:class:`ALLoRAArguments`, defined once), which every ``ALLoRA...Config`` inherits.

Each trainer's config sits with its trainer (``ALLoRAConfig``, TRL's ``SFTConfig`` plus these, in ``sft.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from ..core.settings import COEFFICIENTS, DEFAULT_COEFFICIENT, DEFAULT_ETA, DEFAULT_SCALE, SCALES, validate_settings


def accelerator_available() -> bool:
    """True when a GPU-class accelerator (CUDA/ROCm, XPU, NPU) is present; bf16 and checkpointing pay off there."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


# Length limits of TRL's configs (those a config has): None means no limit, a number must be at least 1 token.
LENGTH_FIELDS = ("max_length", "max_prompt_length", "max_completion_length")


def check_training_values(args) -> None:
    """Raise ``ValueError`` naming the field and the fix for values Transformers and TRL accept but cannot apply.

    The one check behind the trainer configs (:class:`ALLoRAArguments`) and ``allora-trl train``: without it
    ``gradient_accumulation_steps=0`` fails with a ZeroDivisionError, ``max_steps=0`` takes one step, a negative
    ``max_steps`` other than -1 trains ``num_train_epochs`` epochs, ``num_train_epochs <= 0`` writes an untrained
    adapter, a negative ``weight_decay`` or learning rate escapes torch's checks through the parameter groups, and a
    batch size, length limit or ``save_steps`` of 0 or less fails deep in training or saving. ``args`` is any
    ``TrainingArguments``-like object (read before ``TrainingArguments.__post_init__`` converts it).
    """

    def number(name):
        value = getattr(args, name, None)
        return None if isinstance(value, bool) else value

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = number(name)
        if value is not None and value < 1:
            hint = "1 = no accumulation" if name == "gradient_accumulation_steps" else "examples per device and step"
            raise ValueError(f"`{name}` must be an integer of at least 1 ({hint}), got {value}.")
    for name in LENGTH_FIELDS:
        value = number(name)
        if value is not None and value < 1:
            raise ValueError(
                f"`{name}` must be a number of tokens of at least 1 (or None for no limit), got {value}; "
                f"set {name} to the longest sequence to keep (e.g. 1024)."
            )
    max_steps, epochs = number("max_steps"), number("num_train_epochs")
    if max_steps is not None and max_steps <= 0 and max_steps != -1:
        effect = "one step" if max_steps == 0 else f"num_train_epochs={epochs} epochs instead"
        raise ValueError(
            f"`max_steps` must be a positive number of steps, or -1 to train for num_train_epochs; got {max_steps} "
            f"(Transformers would silently train {effect})."
        )
    if max_steps == -1 and epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(
            f"`num_train_epochs` must be a positive finite number when max_steps is -1 (train by epochs), got "
            f"{epochs}; set num_train_epochs > 0 or a positive max_steps."
        )
    for name, example in (("learning_rate", "2e-4"), ("weight_decay", "0.0, no decay")):
        value = number(name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0 (e.g. {example}), got {value}.")
    for steps, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy")):
        value = number(steps)
        if getattr(args, strategy, None) == "steps" and value is not None and not value > 0:
            raise ValueError(
                f"`{steps}` must be > 0 with {strategy}='steps' (a number of steps, or below 1 a fraction of the "
                f"run), got {value}; set a positive {steps}, or {strategy}='no'."
            )
    value = number("eval_steps")
    if getattr(args, "eval_strategy", None) == "steps" and value is not None and not value > 0:
        raise ValueError(f"`eval_steps` must be > 0 with eval_strategy='steps' (or None: logging_steps), got {value}.")


@dataclass
class ALLoRAArguments:
    """ALLoRA's settings, added to a TRL trainer config by inheritance (``ALLoRADPOConfig(ALLoRAArguments, DPOConfig)``).

    The one definition of ALLoRA's fields for every trainer:

    Args:
        allora_eta (`float`, defaults to 2.0):
            ALLoRA's eta: the coefficient is ``1/sqrt(||(BA)_i|| + 1/eta^2)``, so it equals eta while ``BA`` is zero
            (the paper's "effective learning rate is eta times the base learning rate"). Finite and > 0.
        allora_coefficient (`str`, defaults to ``"weight"``):
            ``"weight"``: the paper's rule, one coefficient per output row from the row norms of ``BA``.
            ``"output"``: the paper's ablation, one coefficient per token and output from the LoRA branch output.
        allora_scale (`str`, defaults to ``"gradient"``):
            ``"gradient"``: the paper's rule (the coefficient scales the gradients of A and B). ``"update"``: this
            project's extension, not the paper's: the coefficient scales the optimizer's *update* of each row of B
            (and its mean the update of A), so that under Adam the effective learning rate at B = 0 is eta times the
            base one, as the paper intends. Needs ``allora_coefficient="weight"`` and whole (unsharded) LoRA weights:
            single process or DDP, not FSDP or DeepSpeed. See :mod:`allora_trl.core.update_scaling`.

    Unlike TRL's configs, ``bf16`` and ``gradient_checkpointing`` default to what suits the machine: on with a GPU
    (as TRL), off without one (fp32 and no checkpointing: TRL's defaults are about 20 times slower on CPUs without
    bf16 units). Set them explicitly to override.
    """

    allora_eta: float = field(
        default=DEFAULT_ETA,
        metadata={"help": "ALLoRA eta (> 0): the coefficient 1/sqrt(||(BA)_i|| + 1/eta^2) equals eta at B = 0."},
    )
    allora_coefficient: str = field(
        default=DEFAULT_COEFFICIENT,
        metadata={
            "help": "'weight' (the paper's per-row rule) or 'output' (the per-token ablation).",
            "choices": list(COEFFICIENTS),
        },
    )
    allora_scale: str = field(
        default=DEFAULT_SCALE,
        metadata={
            "help": "'gradient' (the paper: c scales the A/B gradients) or 'update' (this project's extension: c "
            "scales the optimizer's update of B's rows, mean(c) that of A).",
            "choices": list(SCALES),
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Defaults to True with a GPU (unless fp16), False without one."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Gradient checkpointing. Defaults to True with a GPU, False without one."},
    )

    def __post_init__(self):
        if getattr(self, "use_vllm", False):
            # GRPO / RLOO: generation in vLLM runs on weights synced by merging the adapter; that path cannot be
            # tested without a GPU here, so it is refused rather than trusted.
            raise ValueError(
                "ALLoRA does not support `use_vllm=True` yet (generation in vLLM is untested with ALLoRA adapters). "
                "Set use_vllm=False: completions are then generated with transformers, through peft's forward."
            )
        self.allora_eta = validate_settings(self.allora_eta, self.allora_coefficient, self.allora_scale, "allora_")
        check_training_values(self)
        on_accelerator = accelerator_available() and not self.use_cpu
        if self.bf16 is None:
            self.bf16 = on_accelerator and not self.fp16
        if getattr(self, "activation_checkpointing", None) is None and self.gradient_checkpointing is None:
            # transformers >= 5.2x renamed the field to activation_checkpointing (gradient_checkpointing is its
            # deprecated alias); set the new name where it exists so no deprecation warning is raised.
            name = "activation_checkpointing" if hasattr(self, "activation_checkpointing") else "gradient_checkpointing"
            setattr(self, name, on_accelerator)
        super().__post_init__()

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments):
        """Convert a ``TrainingArguments`` (or the parent TRL config) into this config, keeping every field's value.

        TRL's trainers rebuild any args that are not their own config class as a plain one, which would drop ALLoRA's
        fields; converting first keeps them. Fields the source class has and ``ALLoRAConfig`` lacks raise, rather than being
        dropped silently.
        """
        if isinstance(args, cls):
            return args
        values = args.to_dict()
        for key in values:
            if key.endswith("_token"):  # to_dict masks every "*_token" field (hub_token, but also eos/pad_token)
                values[key] = getattr(args, key)
        values.pop("push_to_hub_token", None)  # transformers < 5
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Cannot convert {type(args).__name__} to {cls.__name__} without losing the fields {unknown}: "
                f"build a {cls.__name__} (or a subclass of it) directly."
            )
        return cls(**values)
