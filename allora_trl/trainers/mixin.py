"""``ALLoRATrainerMixin``: the one place that turns a TRL trainer into an ALLoRA trainer.

``class ALLoRADPOTrainer(ALLoRATrainerMixin, DPOTrainer)`` is all a trainer needs. The mixin
1. takes exactly the TRL parent's constructor arguments, converting plain ``TrainingArguments`` (or the parent's own
   config) into the ALLoRA config without losing a field, and refusing settings that cannot take effect;
2. normalises the LoRA config to ALLoRA's (``lora_alpha = r``, ``lora_dropout = 0``), warning once with every value
   changed, and seeds before the parent builds the peft model, so one seed gives one start on every TRL version;
3. lets the parent build the peft model, then installs the rule with :func:`~allora_trl.apply_allora` on the
   adapters being trained only: a frozen reference adapter (DPO/KTO's ``ref``) never gets it;
4. builds named optimizer groups (and wires ``allora_scale="update"``, for the trainer's or the user's optimizer);
5. logs coefficient statistics and stops on non-finite values through :class:`~allora_trl.core.callback.ALLoRACallback`;
6. writes ``allora_config.json`` and a model card naming ALLoRA with every save (final model and checkpoints);
7. runs the distributed start-up checks (:func:`~allora_trl.core.distributed.check_distributed_setup`).
"""

from __future__ import annotations

import inspect
import logging

import torch
from peft import LoraConfig, PeftModel
from transformers import enable_full_determinism, set_seed

from ..core.callback import ALLoRACallback, NonFiniteTrainingError
from ..core.distributed import check_distributed_setup
from ..core.model import (
    apply_allora,
    check_target_modules,
    iter_lora_layers,
    normalize_lora_config,
    set_lora_scaling_one,
    write_allora_configs,
)
from ..core.update_scaling import enable_update_scaling
from .config import ALLoRAArguments
from .model_card import ALLORA_TAG, write_model_card


def default_lora_config() -> LoraConfig:
    """The LoRA used when neither a ``peft_config`` nor a peft model is given: r=16 on all linear layers."""
    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_parent(cls: type) -> type:
    """The TRL trainer an ALLoRA trainer class extends: the first class after the mixin in its MRO."""
    mro = cls.__mro__
    return mro[mro.index(ALLoRATrainerMixin) + 1]


def trained_adapters(model) -> list[str]:
    """Names of the LoRA adapters whose weights are trained (``requires_grad``); frozen reference adapters excluded."""
    names = []
    for _, layer in iter_lora_layers(model):
        for name, linear in layer.lora_A.items():
            if linear.weight.requires_grad and name not in names:
                names.append(name)
    return names


class ALLoRATrainerMixin:
    """Mixin placed before a TRL trainer: ``class ALLoRAXTrainer(ALLoRATrainerMixin, XTrainer)``.

    Subclasses set ``config_class`` (the matching ``ALLoRA...Config``). The card name and tags are derived from the
    TRL parent: ``_name = "ALLoRA (DPO)"``, ``_tag_names = [*DPOTrainer._tag_names, "allora"]``.
    """

    config_class: type[ALLoRAArguments]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        parent = trl_parent(cls)
        cls._name = f"ALLoRA ({parent._name})"
        cls._tag_names = [*getattr(parent, "_tag_names", []), ALLORA_TAG]
        cls._parent_paper = dict(getattr(parent, "_paper", {}) or {})

    def __init__(self, *args, **kwargs):
        parent = trl_parent(type(self))
        bound = inspect.signature(parent.__init__).bind(None, *args, **kwargs)  # the parent's own constructor
        params = bound.arguments
        model = params.get("model")
        self._allora_logger = logging.getLogger(type(self).__module__)
        params["args"] = args = self._resolve_args(params.get("args"), model)
        params["peft_config"] = self._resolve_peft_config(params.get("peft_config"), model)
        # TRL builds the peft model (random A) before transformers' Trainer seeds; seed first so that one seed
        # gives one start under every TRL version.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        super().__init__(*bound.args[1:], **bound.kwargs)

        adapters = trained_adapters(self.model)
        if not adapters:
            raise ValueError(
                f"{type(self).__name__} found no trainable LoRA adapter on the model: pass `peft_config=LoraConfig(...)` "
                "or a peft model whose adapter is trainable (`is_trainable=True`)."
            )
        for name in adapters:
            # peft trains what matches and keeps a misspelt name silently: refuse it before any training
            check_target_modules(self.model, self.model.peft_config[name].target_modules, "target_modules")
            apply_allora(
                self.model,
                eta=args.allora_eta,
                coefficient=args.allora_coefficient,
                adapter_name=name,
                scale=args.allora_scale,
            )
        self.allora_adapters = adapters
        self.update_scaling = None
        self.add_callback(ALLoRACallback(self))
        check_distributed_setup(self.args, self.accelerator, self.model)  # FSDP1, update scaling + ZeRO...

    # ----- construction --------------------------------------------------------------------------------------------

    def _resolve_args(self, args, model) -> ALLoRAArguments:
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            name = str(name or "model").rstrip("/").split("/")[-1] or "model"
            suffix = "" if self._name == "ALLoRA (SFT)" else f"-{trl_parent(type(self))._name}"
            return self.config_class(output_dir=f"{name}-ALLoRA{suffix}")
        return self.config_class.from_training_arguments(args)

    def _resolve_peft_config(self, peft_config, model):
        log = self._allora_logger
        if peft_config is None:
            if isinstance(model, PeftModel):
                changes = []
                for name, config in model.peft_config.items():
                    normalized, changed = normalize_lora_config(config)  # raises before training for DoRA etc.
                    changes += [f"adapter {name!r}: {c}" for c in changed]
                    model.peft_config[name] = normalized
                    set_lora_scaling_one(model, name)  # before TRL copies it into a reference adapter
                if changes:
                    log.warning(
                        "%s set the peft model to ALLoRA's scaling 1 and no dropout: %s",
                        type(self).__name__,
                        "; ".join(changes),
                    )
                return None
            log.info("%s: no peft_config given; using the default %s", type(self).__name__, default_lora_config())
            return default_lora_config()
        normalized, changes = normalize_lora_config(peft_config)
        if isinstance(model, torch.nn.Module):  # a model given by path is checked once TRL has loaded it
            check_target_modules(model, normalized.target_modules, "target_modules")
        if changes:
            log.warning(
                "%s changed the LoRA config to ALLoRA's scaling 1 and no dropout: %s",
                type(self).__name__,
                "; ".join(changes),
            )
        return normalized

    # ----- optimizer -----------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """Named parameter groups ``lora_A`` / ``lora_B`` / ``other`` / ``other_no_decay``; ``weight_decay`` kept.

        ``model`` is kept as an argument: transformers' FSDP path passes the wrapped model. Optimizers that build
        their own groups (factories, GaLore, LOMO, layer-wise) are left to ``Trainer.create_optimizer``. A user's
        optimizer (``optimizers=(opt, sched)``) is kept as given; ``allora_scale="update"`` is wired on it too.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                super().create_optimizer(model)
            else:
                self.optimizer = optimizer_cls(self.allora_parameter_groups(opt_model), **dict(optimizer_kwargs))
        if self.args.allora_scale == "update" and self.update_scaling is None:
            # the project's extension: c moves from the gradient to the update (core/update_scaling.py)
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

    # ----- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the TRL parent does (a plain LoRA adapter), then ``allora_config.json`` and the model card.

        Transformers saves checkpoints through this method too, so every checkpoint carries both. A model whose
        trainable weights are not finite is not saved: the run fails instead of leaving a NaN adapter behind.
        """
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteTrainingError(
                f"Not saving: {len(bad)} trainable tensors hold NaN or infinite values (first: {bad[0]}). Lower the "
                "learning rate or allora_eta, or enable gradient clipping (max_grad_norm)."
            )
        super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            write_allora_configs(model, folder)  # eta, coefficient and scale of each trained adapter
            write_model_card(self, folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (written into ``output_dir`` with checkpoints), naming ALLoRA and its settings."""
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, model_name=model_name, dataset_name=dataset_name, tags=tags)
