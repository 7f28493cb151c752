"""``ALLoRATrainerMixin``: the one place that turns a TRL trainer into an ALLoRA trainer.

``class ALLoRADPOTrainer(ALLoRATrainerMixin, DPOTrainer)`` is all a trainer needs. The mixin
1. takes exactly the TRL parent's constructor arguments, converting plain ``TrainingArguments`` (or the parent's own
   config) into the ALLoRA config without losing a field, and refusing settings that cannot take effect;
2. normalises the LoRA config to ALLoRA's (``lora_alpha = r``, ``lora_dropout = 0``), warning once with every value
   changed, for the adapters being trained only (a frozen adapter keeps its own; an adapter already trained with a
   scaling other than 1 is refused, since scaling 1 would change its outputs), and seeds before the parent builds the
   peft model, so one seed gives one start on every TRL version;
3. lets the parent build the peft model, then installs the rule with :func:`~allora_trl.apply_allora` on the
   adapters being trained only: a frozen reference adapter (DPO/KTO's ``ref``) never gets it;
4. builds named optimizer groups (and wires ``allora_scale="update"``, for the trainer's or the user's optimizer);
5. logs coefficient statistics and stops on non-finite values through :class:`~allora_trl.core.callback.ALLoRACallback`;
6. writes ``allora_config.json`` and a model card naming ALLoRA with every save (final model and checkpoints);
7. runs the distributed start-up checks (:func:`~allora_trl.core.distributed.check_distributed_setup`);
8. refuses to resume from a checkpoint whose ``allora_config.json`` records other ALLoRA settings (``train``).
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from peft import LoraConfig, PeftModel
from transformers import enable_full_determinism, set_seed
from transformers.trainer_utils import get_last_checkpoint

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
from ..core.settings import ALLoRASettings, check_resume_settings
from ..core.update_scaling import enable_update_scaling
from .config import ALLoRAArguments
from .model_card import ALLORA_TAG, write_model_card


def default_lora_config(task_type: str = "CAUSAL_LM") -> LoraConfig:
    """The LoRA used when neither a ``peft_config`` nor a peft model is given: r=16 on all linear layers.

    ``task_type="SEQ_CLS"`` (the Reward trainer's): peft then leaves the classification head (``score``) out of the
    LoRA layers and trains it whole, as ``modules_to_save``.
    """
    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)


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
    # Without ``args``, output goes to ``<model>-ALLoRA<suffix>``; None: "-" and the TRL parent's name ("-DPO").
    default_output_suffix: str | None = None
    # The ``task_type`` of :func:`default_lora_config` (the Reward trainer trains a sequence-classification model).
    default_task_type: str = "CAUSAL_LM"

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
            # the gradient rule; allora_scale="update" is wired on the optimizer (create_optimizer), which then
            # records "update" on the layers: a record never says "update" while only the gradient rule runs
            apply_allora(self.model, eta=args.allora_eta, coefficient=args.allora_coefficient, adapter_name=name)
        self.allora_adapters = adapters
        self.update_scaling = None
        self.add_callback(ALLoRACallback(self))
        check_distributed_setup(self.args, self.accelerator, self.model)  # FSDP1, update scaling + ZeRO...

    # ----- construction --------------------------------------------------------------------------------------------

    def _resolve_args(self, args, model) -> ALLoRAArguments:
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            name = str(name or "model").rstrip("/").split("/")[-1] or "model"
            suffix = self.default_output_suffix
            suffix = f"-{trl_parent(type(self))._name}" if suffix is None else suffix
            return self.config_class(output_dir=f"{name}-ALLoRA{suffix}")
        return self.config_class.from_training_arguments(args)

    def _resolve_peft_config(self, peft_config, model):
        log = self._allora_logger
        if peft_config is None:
            if isinstance(model, PeftModel):
                # only the adapters being trained get ALLoRA's settings: a frozen one keeps its own (and its outputs)
                normalized = {}
                for name in trained_adapters(model):
                    normalized[name] = normalize_lora_config(model.peft_config[name])  # raises for DoRA etc.
                    self._refuse_rescaling_a_trained_adapter(model, name)
                changes = []
                for name, (config, changed) in normalized.items():  # all checked: now change the model
                    changes += [f"adapter {name!r}: {c}" for c in changed]
                    model.peft_config[name] = config
                    set_lora_scaling_one(model, name)  # before TRL copies it into a reference adapter
                if changes:
                    log.warning(
                        "%s set the peft model to ALLoRA's scaling 1 and no dropout: %s",
                        type(self).__name__,
                        "; ".join(changes),
                    )
                return None
            default = default_lora_config(self.default_task_type)
            log.info("%s: no peft_config given; using the default %s", type(self).__name__, default)
            return default
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

    def _refuse_rescaling_a_trained_adapter(self, model, name: str) -> None:
        """Raise, changing nothing, if adapter ``name`` is already trained (B != 0) with a LoRA scaling other than 1.

        ALLoRA's scaling 1 would change such an adapter's outputs (and, for DPO/KTO, its reference copy's).
        """
        for layer_name, layer in iter_lora_layers(model):
            if name not in layer.lora_B or abs(float(layer.scaling[name]) - 1.0) <= 1e-6:
                continue
            if torch.count_nonzero(layer.lora_B[name].weight).item():
                raise ValueError(
                    f"{type(self).__name__}: adapter {name!r} is already trained (its B is not zero) with LoRA scaling "
                    f"{layer.scaling[name]:g} (layer {layer_name!r}: lora_alpha {layer.lora_alpha[name]} != r "
                    f"{layer.r[name]}); ALLoRA's scaling 1 would change its outputs. Merge it into the base model "
                    "(`model = model.merge_and_unload()`) and train a new ALLoRA adapter on top, or continue it with "
                    f"TRL's {trl_parent(type(self)).__name__} (plain LoRA)."
                )

    # ----- resuming ------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, refusing to resume from a checkpoint trained with other ALLoRA settings.

        The checkpoint (a path, or ``True``: the latest in ``output_dir``, found as transformers finds it) must record
        this run's ``allora_eta``, ``allora_coefficient`` and ``allora_scale`` in its ``allora_config.json``: else
        the run would silently go on with the new values. The error names both values and the fix.
        """
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # None: transformers says so
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
            self.check_resume_settings(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def check_resume_settings(self, checkpoint) -> None:
        """Raise if ``checkpoint`` records other ALLoRA settings than this trainer's; warn if it records none."""
        args = self.args
        wanted = ALLoRASettings(eta=args.allora_eta, coefficient=args.allora_coefficient, scale=args.allora_scale)
        for name in self.allora_adapters:
            if check_resume_settings(checkpoint, wanted, name) is None:
                self._allora_logger.warning(
                    "%s: checkpoint %r has no allora_config.json for adapter %r (not written by an ALLoRA trainer); "
                    "resuming it with allora_eta=%s, allora_coefficient=%r, allora_scale=%r.",
                    type(self).__name__,
                    os.fspath(checkpoint),
                    name,
                    wanted.eta,
                    wanted.coefficient,
                    wanted.scale,
                )

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
