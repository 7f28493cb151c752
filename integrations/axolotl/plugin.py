"""The ALLoRA plugin for Axolotl: ``adapter: allora`` is LoRA built by Axolotl's own loader, trained with ALLoRA.

How it hooks into Axolotl 0.19 (see README.md for the user-facing side):

* ``get_adapter_capabilities`` registers ``allora`` as a LoRA-like adapter, so Axolotl's config validator accepts
  it and its generic LoRA loader (``load_lora``) builds the peft model from the usual ``lora_*`` settings.
* ``get_input_args`` adds ``allora_eta`` / ``allora_coefficient`` and the ``adapter: allora`` rules (args.py); with
  ``load_in_4bit`` / ``load_in_8bit`` those rules put the bitsandbytes config into ``model_kwargs``, which Axolotl's
  loader hands to ``from_pretrained`` for every adapter name.
* ``post_model_build`` runs ``prepare_model_for_kbit_training`` on a bitsandbytes-quantised base, which Axolotl
  does itself only for its ``lora`` / ``qlora`` names.
* ``post_lora_load`` installs ALLoRA right after the LoRA layers exist; ``post_model_load`` (a safety net) and
  ``post_trainer_create`` install it where that did not happen, e.g. when the trainer builds the peft model
  (Axolotl hands DPO/IPO/KTO trainers only a LoRA config). ``post_trainer_create`` first runs the same distributed
  start-up checks as the TRL trainers (``allora_trl.core.distributed.check_distributed_setup``: FSDP1 is refused)
  and refuses to resume (``resume_from_checkpoint``, ``auto_resume_from_checkpoints``) from a checkpoint whose
  ``allora_config.json`` records another eta or coefficient.
* With Axolotl's fused LoRA kernels on (``lora_qkv_kernel``, ``lora_o_kernel``, ``lora_mlp_kernel``),
  ``post_model_load``, which Axolotl calls right after patching its kernels in, rebinds them to ALLoRA's versions
  (kernels.py) on every block whose LoRA layers carry the rule.
* ``add_callbacks_post_trainer`` adds the shared :class:`allora_trl.core.callback.ALLoRACallback` (coefficient
  statistics on logged steps, the non-finite stop, ``allora_config.json`` in every checkpoint); ``post_train``
  writes ``allora_config.json`` beside the final adapter.
"""

from __future__ import annotations

import os

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.distributed import is_main_process
from axolotl.utils.logging import get_logger

from allora_trl.core.callback import ALLoRACallback
from allora_trl.core.distributed import check_distributed_setup
from allora_trl.core.model import allora_variants, apply_allora, iter_lora_layers, write_allora_configs
from allora_trl.core.settings import (
    ALLORA_CONFIG_NAME,
    DEFAULT_COEFFICIENT,
    DEFAULT_ETA,
    ALLoRASettings,
    check_resume_settings,
    read_allora_config,
)

from .args import ADAPTER_NAME, ALLORA_KERNEL_FIELDS

# Axolotl shows INFO records only from loggers named "axolotl..." (other loggers: WARNING and up).
LOG = get_logger("axolotl.integrations.allora")


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


def _trained_adapter(model) -> str | None:
    """The adapter that is trained: peft's active adapter, never a frozen one such as TRL's DPO/KTO "ref" copy."""
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if len(active) == 1 else None
    return active if isinstance(active, str) else None


def _has_allora(model) -> bool:
    return next(allora_variants(model, _trained_adapter(model)), None) is not None


def _is_bnb_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


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


def _log_continued_plain_lora(cfg, model, adapter, eta: float, coefficient: str) -> None:
    """Say what continuing an adapter from ``lora_model_dir`` changes: the settings a plain LoRA adapter (no
    ``allora_config.json``) is continued with, and its LoRA dropout, which ALLoRA sets to 0."""
    if not os.path.isfile(os.path.join(str(cfg.lora_model_dir), ALLORA_CONFIG_NAME)):
        LOG.warning(
            f"adapter: allora: `lora_model_dir` {str(cfg.lora_model_dir)!r} has no {ALLORA_CONFIG_NAME} (a plain LoRA "
            f"adapter): continuing it with ALLoRA at eta={eta}, coefficient={coefficient!r} (the config's values, "
            "else the defaults). Set `allora_eta` / `allora_coefficient` to choose them."
        )
    config = getattr(model, "peft_config", {}).get(adapter)
    dropout = getattr(config, "lora_dropout", 0.0)
    if dropout:
        LOG.warning(
            f"adapter: allora: the adapter in `lora_model_dir` was saved with lora_dropout={dropout}; ALLoRA trains "
            "without dropout, so it is continued with lora_dropout 0."
        )


def resume_checkpoint(cfg) -> str | None:
    """The checkpoint Axolotl will resume from: ``resume_from_checkpoint``, else with ``auto_resume_from_checkpoints``
    the last ``checkpoint-N`` in ``output_dir`` (Axolotl's ``determine_last_checkpoint``, which runs after
    ``post_trainer_create``)."""
    if cfg.resume_from_checkpoint:
        return str(cfg.resume_from_checkpoint)
    if not cfg.auto_resume_from_checkpoints or not cfg.output_dir or not os.path.isdir(str(cfg.output_dir)):
        return None
    steps = [
        (int(name.split("-")[-1]), name)
        for name in os.listdir(str(cfg.output_dir))
        if name.startswith("checkpoint-") and name.split("-")[-1].isdigit()
    ]
    return os.path.join(str(cfg.output_dir), max(steps)[1]) if steps else None


def check_resume(cfg, model) -> None:
    """Refuse to resume from a checkpoint whose ``allora_config.json`` records another eta or coefficient than this
    run's (the config's, else ``lora_model_dir``'s, else the defaults), naming both values and the fix."""
    checkpoint = resume_checkpoint(cfg)
    if not checkpoint or not os.path.isdir(checkpoint):
        return
    eta, coefficient = resolve_settings(cfg)
    try:
        check_resume_settings(
            checkpoint, ALLoRASettings(eta=eta, coefficient=coefficient), _trained_adapter(model) or "default"
        )
    except ValueError as exc:
        raise ValueError(f"adapter: allora: {exc}") from None


def install_allora(cfg, model) -> bool:
    """Install ALLoRA on the trained adapter of ``model`` if it is a peft model without it; return whether ALLoRA is
    installed. Other adapters (a frozen reference copy) are left as they are: the rule belongs to the trained one."""
    if not getattr(model, "peft_config", None):
        return False
    if _has_allora(model):
        return True
    adapter = _trained_adapter(model)
    eta, coefficient = resolve_settings(cfg)
    if cfg.lora_model_dir:
        _check_scaling_one(model)
        _log_continued_plain_lora(cfg, model, adapter, eta, coefficient)
    apply_allora(model, eta=eta, coefficient=coefficient, adapter_name=adapter)
    count = sum(1 for _ in allora_variants(model, adapter))
    bases = sorted({type(layer.get_base_layer()).__name__ for _, layer in iter_lora_layers(model)})
    LOG.info(
        f"ALLoRA installed on {count} LoRA layers of adapter {adapter!r} (eta={eta}, coefficient={coefficient!r}; "
        f"base layers: {', '.join(bases)})."
    )
    return True


def install_kernels(cfg, model) -> None:
    """With ``lora_qkv_kernel`` / ``lora_o_kernel`` / ``lora_mlp_kernel`` on, rebind the kernels Axolotl patched in
    (``apply_lora_kernel_patches``, just before ``post_model_load``) to ALLoRA's versions (kernels.py)."""
    fields = [k for k in ALLORA_KERNEL_FIELDS if cfg.get(k)]
    if not fields or not getattr(model, "peft_config", None):
        return
    from .kernels import check_axolotl_version, install_allora_kernels

    check_axolotl_version(fields)
    counts = install_allora_kernels(model)
    LOG.info(
        f"ALLoRA kernels in place of Axolotl's fused LoRA kernels ({', '.join(fields)}): {counts['qkv']} attention "
        f"QKV, {counts['o']} attention O, {counts['mlp']} MLP blocks."
    )


def prepare_quantized_base(cfg, model) -> None:
    """``prepare_model_for_kbit_training`` on a bitsandbytes base, as Axolotl does for its ``lora`` / ``qlora`` names.

    It freezes the base, casts its non-quantised 16-bit weights to fp32 and, with ``gradient_checkpointing``, enables
    checkpointing with input gradients; Axolotl then casts norms and embeddings back to the run's dtype as for QLoRA.
    Skipped under DeepSpeed ZeRO-3, where Axolotl skips it too (every parameter must keep one dtype).
    Raises when ``load_in_4bit`` / ``load_in_8bit`` asked for a quantised base but the model was loaded unquantised:
    training would otherwise go on silently at full precision.
    """
    requested = cfg.load_in_4bit or cfg.load_in_8bit
    if requested and not _is_bnb_quantized(model):
        raise RuntimeError(
            "adapter: allora: `load_in_4bit` / `load_in_8bit` is set but the base model was loaded unquantised (the "
            "bitsandbytes config in `model_kwargs.quantization_config` did not reach `from_pretrained`). Check that "
            "bitsandbytes is installed, or remove `load_in_4bit` / `load_in_8bit`."
        )
    if not _is_bnb_quantized(model):
        return
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return
    from peft import prepare_model_for_kbit_training

    LOG.info("adapter: allora: preparing the quantised base with prepare_model_for_kbit_training")
    prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
        gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
    )


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

    def post_model_build(self, cfg, model):
        """Prepare a bitsandbytes-quantised base for training before Axolotl's post-build dtype casts and the LoRA."""
        if cfg.adapter == ADAPTER_NAME:
            prepare_quantized_base(cfg, model)

    def post_lora_load(self, cfg, model):
        """Install ALLoRA as soon as the LoRA layers exist, before Axolotl's post-load patches and the trainer."""
        if cfg.adapter == ADAPTER_NAME and not install_allora(cfg, model):
            LOG.info(
                "adapter: allora: no peft model yet (the trainer builds it); ALLoRA is installed after trainer creation."
            )

    def post_model_load(self, cfg, model):
        """Safety net for the install; then, right after Axolotl patched its fused LoRA kernels in, swap ALLoRA's in."""
        if cfg.adapter == ADAPTER_NAME and getattr(model, "peft_config", None) and not install_allora(cfg, model):
            raise RuntimeError("adapter: allora: ALLoRA could not be installed on the loaded peft model.")
        if cfg.adapter == ADAPTER_NAME:
            install_kernels(cfg, model)

    def post_trainer_create(self, cfg, trainer):
        """Refuse distributed set-ups where ALLoRA's layers would see sharded weights (FSDP1, ...), exactly as the TRL
        trainers do at construction, and resuming from a checkpoint trained with other ALLoRA settings; then make
        sure the trained adapter carries the rule."""
        if cfg.adapter != ADAPTER_NAME:
            return
        check_distributed_setup(trainer.args, getattr(trainer, "accelerator", None), trainer.model)
        check_resume(cfg, trainer.model)
        if not install_allora(cfg, trainer.model):
            raise RuntimeError(
                "adapter: allora: the trainer's model has no LoRA adapter to install ALLoRA on "
                f"(got {type(trainer.model).__name__})."
            )

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if cfg.adapter != ADAPTER_NAME:
            return []
        return [ALLoRACallback(trainer, write_checkpoint_config=True)]

    def post_train(self, cfg, model):
        """Write ``allora_config.json`` beside the adapter Axolotl saved in ``output_dir``."""
        if cfg.adapter != ADAPTER_NAME or not is_main_process() or not cfg.output_dir:
            return
        if _has_allora(model):
            write_allora_configs(model, cfg.output_dir)
