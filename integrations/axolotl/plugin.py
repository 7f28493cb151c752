"""The ALLoRA plugin for Axolotl: ``adapter: allora`` is LoRA built by Axolotl's own loader, trained with ALLoRA.

How it hooks into Axolotl 0.19 (see README.md for the user-facing side):

* ``get_adapter_capabilities`` registers ``allora`` as a LoRA-like adapter, so Axolotl's config validator accepts
  it and its generic LoRA loader (``load_lora``) builds the peft model from the usual ``lora_*`` settings.
* ``get_input_args`` adds ``allora_eta`` / ``allora_coefficient`` and the ``adapter: allora`` rules (args.py).
* ``post_lora_load`` installs ALLoRA right after the LoRA layers exist; ``post_model_load`` (a safety net) and
  ``post_trainer_create`` install it where that did not happen, e.g. when the trainer builds the peft model
  (Axolotl hands DPO/KTO/IPO trainers only a LoRA config).
* ``add_callbacks_post_trainer`` adds :class:`ALLoRACallback`, which records the coefficient statistics on the
  steps that are logged and writes ``allora_config.json`` into every checkpoint; ``post_train`` writes it beside
  the final adapter.
"""

from __future__ import annotations

import os

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.distributed import is_main_process
from axolotl.utils.logging import get_logger
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from allora_trl.core.model import (
    ALLORA_CONFIG_NAME,
    DEFAULT_COEFFICIENT,
    DEFAULT_ETA,
    allora_variants,
    apply_allora,
    iter_lora_layers,
    read_allora_config,
    write_allora_configs,
)
from allora_trl.core.stats import collect_allora_stats, set_allora_stats_recording, update_is_logged

from .args import ADAPTER_NAME

# Axolotl shows INFO records only from loggers named "axolotl..." (other loggers: WARNING and up).
LOG = get_logger("axolotl.integrations.allora")

# How Axolotl's trainer reduces a stored metric over the steps between two logs.
_STAT_REDUCTIONS = {
    "allora/coefficient_min": "min",
    "allora/coefficient_max": "max",
    "allora/coefficient_mean": "mean",
    "allora/row_norm_mean": "mean",
}


def resolve_settings(cfg) -> tuple[float, str]:
    """eta and coefficient for this run: the config's, else those saved in ``lora_model_dir``, else the defaults."""
    eta, coefficient = cfg.allora_eta, cfg.allora_coefficient
    if (eta is None or coefficient is None) and cfg.lora_model_dir:
        path = os.path.join(str(cfg.lora_model_dir), ALLORA_CONFIG_NAME)
        if os.path.isfile(path):
            saved = read_allora_config(cfg.lora_model_dir)
            eta = saved.eta if eta is None else eta
            coefficient = saved.coefficient if coefficient is None else coefficient
    return (DEFAULT_ETA if eta is None else float(eta)), (coefficient or DEFAULT_COEFFICIENT)


def _has_allora(model) -> bool:
    return next(allora_variants(model), None) is not None


def _check_scaling_one(model) -> None:
    """A loaded adapter (``lora_model_dir``) must already have scaling 1; ALLoRA would otherwise change its outputs."""
    for name, layer in iter_lora_layers(model):
        for adapter, scaling in layer.scaling.items():
            if abs(float(scaling) - 1.0) > 1e-6:
                raise ValueError(
                    f"adapter: allora needs LoRA scaling 1 (lora_alpha == r), but layer {name!r} adapter {adapter!r} "
                    f"has scaling {scaling} (from the adapter in `lora_model_dir`). Continue training it with "
                    "`adapter: lora`, or start a new ALLoRA adapter."
                )


def install_allora(cfg, model) -> bool:
    """Install ALLoRA on ``model`` if it is a peft model without it; return whether ALLoRA is installed."""
    if _has_allora(model):
        return True
    if not getattr(model, "peft_config", None):
        return False
    if cfg.lora_model_dir:
        _check_scaling_one(model)
    eta, coefficient = resolve_settings(cfg)
    apply_allora(model, eta=eta, coefficient=coefficient)
    count = sum(1 for _ in allora_variants(model))
    LOG.info(f"ALLoRA installed on {count} LoRA layers (eta={eta}, coefficient={coefficient!r}).")
    return True


class ALLoRACallback(TrainerCallback):
    """Logs ALLoRA's coefficient statistics and saves ``allora_config.json`` with every checkpoint.

    Recording is switched on only for the optimizer steps that will be logged (the same test as transformers'
    ``DefaultFlowCallback``), so other steps pay nothing. The statistics go through Axolotl's
    ``trainer.store_metrics``, which adds them to the next ``trainer.log`` call and so to every reporter and to
    ``trainer_state.json``; a trainer without ``store_metrics`` gets them added in ``on_log``.
    """

    def __init__(self, trainer=None):
        self.trainer = trainer
        self.recording = False
        self.pending: dict[str, float] = {}

    def _model(self, kwargs):
        model = getattr(self.trainer, "model", None)
        return model if model is not None else kwargs.get("model")

    def on_step_begin(self, args, state, control, **kwargs):
        model = self._model(kwargs)
        if model is not None and update_is_logged(args, state, state.global_step + 1):
            set_allora_stats_recording(model, True)
            self.recording = True

    def on_step_end(self, args, state, control, **kwargs):
        if not self.recording:
            return
        model = self._model(kwargs)
        stats = collect_allora_stats(model)
        set_allora_stats_recording(model, False)
        self.recording = False
        if not stats:
            return
        store = getattr(self.trainer, "store_metrics", None)
        if callable(store):
            store({key: (value, _STAT_REDUCTIONS.get(key, "mean")) for key, value in stats.items()}, train_eval="train")
        else:
            self.pending.update(stats)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None and "loss" in logs:
            logs.update(self.pending)
            self.pending = {}

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        model = self._model(kwargs)
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if model is not None and os.path.isdir(folder):
            write_allora_configs(model, folder)


class ALLoRAPlugin(BasePlugin):
    """Axolotl plugin: ``adapter: allora`` trains a plain LoRA adapter with the ALLoRA gradient rule."""

    def get_input_args(self) -> str:
        return "allora_trl.integrations.axolotl.args.ALLoRAArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # lora_like: Axolotl's own LoRA loader builds the adapter; relora=False: a ReLoRA restart merges and
        # re-initialises the adapter, which this plugin does not re-install ALLoRA after.
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=True, relora=False)]

    def get_lora_config_kwargs(self, cfg) -> dict:
        if cfg.adapter != ADAPTER_NAME:
            return {}
        # Belt and braces for configs that bypassed validation: an ALLoRA LoraConfig has neither.
        return {"use_dora": False, "use_rslora": False}

    def post_lora_load(self, cfg, model):
        """Install ALLoRA as soon as the LoRA layers exist, before Axolotl's post-load patches and the trainer."""
        if cfg.adapter == ADAPTER_NAME and not install_allora(cfg, model):
            LOG.info("adapter: allora: no peft model yet (the trainer builds it); ALLoRA is installed after trainer creation.")

    def post_model_load(self, cfg, model):
        if cfg.adapter == ADAPTER_NAME and getattr(model, "peft_config", None) and not install_allora(cfg, model):
            raise RuntimeError("adapter: allora: ALLoRA could not be installed on the loaded peft model.")

    def post_trainer_create(self, cfg, trainer):
        if cfg.adapter != ADAPTER_NAME:
            return
        if not install_allora(cfg, trainer.model):
            raise RuntimeError(
                "adapter: allora: the trainer's model has no LoRA adapter to install ALLoRA on "
                f"(got {type(trainer.model).__name__})."
            )

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if cfg.adapter != ADAPTER_NAME:
            return []
        return [ALLoRACallback(trainer)]

    def post_train(self, cfg, model):
        """Write ``allora_config.json`` beside the adapter Axolotl saved in ``output_dir``."""
        if cfg.adapter != ADAPTER_NAME or not is_main_process() or not cfg.output_dir:
            return
        if _has_allora(model):
            write_allora_configs(model, cfg.output_dir)
