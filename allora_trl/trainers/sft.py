"""``ALLoRATrainer``: TRL's ``SFTTrainer`` with ALLoRA installed on its LoRA layers.

Swapping ``SFTTrainer`` for ``ALLoRATrainer`` is the only change a user makes. The trainer
1. normalises the LoRA config to ALLoRA's (alpha = r, dropout 0), warning once with every value changed;
2. converts plain ``TrainingArguments`` / ``SFTConfig`` into :class:`ALLoRAConfig` without losing a field;
3. lets ``SFTTrainer`` build the peft model, then installs the rule with :func:`apply_allora`;
4. builds named optimizer groups from the trainable LoRA parameters (weight decay passed through);
5. logs coefficient statistics at logging steps through TRL's metrics, and writes ``allora_config.json`` beside
   every saved adapter (final model and checkpoints).
"""

from __future__ import annotations

import inspect
import logging

from peft import LoraConfig, PeftModel
from trl import SFTTrainer

from .config import ALLoRAConfig
from ..core.distributed import check_distributed_setup
from ..core.model import apply_allora, normalize_lora_config, write_allora_configs
from ..core.stats import collect_allora_stats, set_allora_stats_recording, update_is_logged
from ..core.update_scaling import enable_update_scaling

logger = logging.getLogger(__name__)


def default_lora_config() -> LoraConfig:
    """The LoRA used when neither a ``peft_config`` nor a peft model is given: r=16 on all linear layers."""
    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


_SFT_SIGNATURE = inspect.signature(SFTTrainer.__init__)


class ALLoRATrainer(SFTTrainer):
    """A drop-in ``SFTTrainer`` that trains LoRA adapters with the ALLoRA gradient rule (arXiv 2410.09692).

    Takes exactly ``SFTTrainer``'s arguments. ALLoRA's settings come from ``args`` (an :class:`ALLoRAConfig`; other
    ``TrainingArguments`` are converted). With no ``peft_config`` and a model that is not a peft model it trains
    :func:`default_lora_config` (r=16, all linear layers).
    """

    def __init__(self, *args, **kwargs):
        bound = _SFT_SIGNATURE.bind(None, *args, **kwargs)  # same constructor as SFTTrainer, whatever its version
        params = bound.arguments
        model = params["model"]
        params["args"] = self._resolve_args(params.get("args"), model)
        params["peft_config"] = self._resolve_peft_config(params.get("peft_config"), model)
        super().__init__(*bound.args[1:], **bound.kwargs)
        apply_allora(self.model, eta=self.args.allora_eta, coefficient=self.args.allora_coefficient)
        check_distributed_setup(self.args, self.accelerator, self.model)  # FSDP1 etc.: fail before training

    @staticmethod
    def _resolve_args(args, model) -> ALLoRAConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return ALLoRAConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-ALLoRA")
        return ALLoRAConfig.from_training_arguments(args)

    @staticmethod
    def _resolve_peft_config(peft_config, model):
        if peft_config is None:
            if isinstance(model, PeftModel):
                for name, config in model.peft_config.items():
                    _, changes = normalize_lora_config(config)  # raises before training, as for a peft_config
                    if changes:  # apply_allora makes these changes once SFTTrainer is built
                        logger.warning(
                            "ALLoRATrainer will set adapter %r to ALLoRA's scaling 1 and no dropout: %s",
                            name, "; ".join(changes),
                        )
                return None
            logger.info("ALLoRATrainer: no peft_config given; using the default %s", default_lora_config())
            return default_lora_config()
        normalized, changes = normalize_lora_config(peft_config)
        if changes:
            logger.warning(
                "ALLoRATrainer changed the LoRA config to ALLoRA's scaling 1 and no dropout: %s", "; ".join(changes)
            )
        return normalized

    # ----- optimizer -----------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """Named parameter groups ``lora_A`` / ``lora_B`` / ``other`` / ``other_no_decay``; ``weight_decay`` kept.

        ``model`` is kept as an argument: transformers' FSDP path passes the wrapped model. Optimizers that build
        their own groups (factories, GaLore, LOMO, layer-wise) are left to ``Trainer.create_optimizer``.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            super().create_optimizer(model)
        else:
            self.optimizer = optimizer_cls(self.allora_parameter_groups(opt_model), **dict(optimizer_kwargs))
        if self.args.allora_scale == "update":  # the project's extension: c moves from the gradient to the update
            self.update_scaling = enable_update_scaling(self.optimizer, opt_model)
        return self.optimizer

    def allora_parameter_groups(self, model) -> list[dict]:
        """Trainable parameters in named groups; ``other`` follows transformers' decay rule (no decay on biases/norms)."""
        decay_names = set(self.get_decay_parameter_names(model))
        buckets = {"lora_A": [], "lora_B": [], "other": [], "other_no_decay": []}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if ".lora_A." in name:
                buckets["lora_A"].append(param)
            elif ".lora_B." in name:
                buckets["lora_B"].append(param)
            elif name in decay_names:
                buckets["other"].append(param)
            else:
                buckets["other_no_decay"].append(param)
        decay = self.args.weight_decay
        return [
            {"name": name, "params": params, "weight_decay": 0.0 if name == "other_no_decay" else decay}
            for name, params in buckets.items()
            if params
        ]

    # ----- statistics ----------------------------------------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        record = update_is_logged(self.args, self.state, self.state.global_step + 1)
        if record:
            set_allora_stats_recording(self.model, True)
        try:
            loss = super().training_step(*args, **kwargs)
        finally:
            if record:
                set_allora_stats_recording(self.model, False)
        if record:
            for key, value in collect_allora_stats(self.model).items():
                self._metrics["train"][key] = [value]  # the last micro-batch of the logged update
        return loss

    # ----- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as ``SFTTrainer`` does (a plain LoRA adapter), then ``allora_config.json`` beside it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_allora_configs(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)
