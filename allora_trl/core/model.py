"""Installing ALLoRA on a peft model, and saving / loading its settings beside a plain LoRA adapter.

An ALLoRA adapter is a LoRA adapter with ``lora_alpha == r`` (scaling 1) and ``lora_dropout == 0``: the
``adapter_config.json`` that peft writes is plain LoRA and loads anywhere a LoRA adapter loads. ALLoRA's own
settings (eta, coefficient), which matter only to continue training, go in ``allora_config.json`` beside it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import layer as lora_layer

from .gradient import validate_coefficient, validate_eta
from .variant import ALLoRALinearVariant

ALLORA_CONFIG_NAME = "allora_config.json"
DEFAULT_ETA = 2.0
DEFAULT_COEFFICIENT = "weight"


@dataclass(frozen=True)
class ALLoRASettings:
    """What ``allora_config.json`` holds. ``paper`` is informative; only eta and coefficient are read back."""

    eta: float = DEFAULT_ETA
    coefficient: str = DEFAULT_COEFFICIENT
    paper: str = "arXiv:2410.09692"

    def __post_init__(self):
        object.__setattr__(self, "eta", validate_eta(self.eta, "eta"))
        validate_coefficient(self.coefficient, "coefficient")


def check_lora_config(config) -> None:
    """Raise a clear error for a peft config ALLoRA cannot be built on (non-LoRA, DoRA, rsLoRA, LoRA bias)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"ALLoRA is built on LoRA: `peft_config` must be a `peft.LoraConfig`, got {type(config).__name__}."
        )
    if config.use_dora:
        raise ValueError(
            "ALLoRA cannot be combined with DoRA: set `use_dora=False` (DoRA's magnitude vector has no place in the "
            "ALLoRA rule; to compare the two, train DoRA with peft's own LoRA trainer)."
        )
    if config.use_rslora:
        raise ValueError(
            "ALLoRA cannot be combined with rsLoRA: set `use_rslora=False`. ALLoRA fixes the scaling at 1 "
            "(lora_alpha == r); rsLoRA's alpha/sqrt(r) scaling would change that."
        )
    if getattr(config, "lora_bias", False):
        raise ValueError("ALLoRA does not train a LoRA bias: set `lora_bias=False`.")


def normalize_lora_config(config: LoraConfig) -> tuple[LoraConfig, list[str]]:
    """Return a copy of ``config`` with scaling 1 and no dropout, and a list naming every value changed.

    ``lora_alpha`` becomes ``r``; ``alpha_pattern`` becomes a copy of ``rank_pattern`` (so every pattern-matched
    layer also gets alpha == its rank); ``lora_dropout`` becomes 0.
    """
    check_lora_config(config)
    new = copy.deepcopy(config)
    changes = []
    if new.lora_alpha != new.r:
        changes.append(f"lora_alpha {new.lora_alpha} -> {new.r}")
        new.lora_alpha = new.r
    rank_pattern = dict(new.rank_pattern or {})
    alpha_pattern = dict(new.alpha_pattern or {})
    if alpha_pattern != rank_pattern:
        changes.append(f"alpha_pattern {alpha_pattern} -> {rank_pattern}")
    new.alpha_pattern = rank_pattern
    if new.lora_dropout:
        changes.append(f"lora_dropout {new.lora_dropout} -> 0.0")
        new.lora_dropout = 0.0
    return new, changes


def _supported_layer_types() -> tuple[type, ...]:
    types = [lora_layer.Linear]
    try:  # peft defines the bitsandbytes LoRA layers only when bitsandbytes is importable
        from peft.tuners.lora import bnb as lora_bnb

        types += [t for t in (getattr(lora_bnb, "Linear8bitLt", None), getattr(lora_bnb, "Linear4bit", None)) if t]
    except Exception:  # noqa: BLE001 - a broken bitsandbytes install must not stop plain LoRA
        pass
    return tuple(types)


def iter_lora_layers(model: torch.nn.Module):
    """Yield ``(name, layer)`` for every peft LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, lora_layer.LoraLayer):
            yield name, module


def apply_allora(
    model: PeftModel,
    eta: float = DEFAULT_ETA,
    coefficient: str = DEFAULT_COEFFICIENT,
    adapter_name: str | None = None,
) -> PeftModel:
    """Install ALLoRA on every LoRA layer of a peft model (all LoRA adapters, or only ``adapter_name``).

    Sets each layer's scaling to 1 and dropout to identity, installs :class:`ALLoRALinearVariant`, updates the
    model's ``LoraConfig`` to match (``lora_alpha == r``, ``alpha_pattern == rank_pattern``, ``lora_dropout == 0``)
    and returns the model. Raises for a model with no LoRA layers, for DoRA / rsLoRA / LoRA-bias adapters, and for
    LoRA layer types other than ``Linear`` (and peft's bitsandbytes 4-/8-bit ``Linear``), naming them.
    """
    eta = validate_eta(eta, "eta")
    validate_coefficient(coefficient, "coefficient")
    peft_configs = getattr(model, "peft_config", None)
    if not peft_configs:
        raise ValueError(
            "apply_allora needs a peft model with LoRA adapters (e.g. `peft.get_peft_model(model, LoraConfig(...))`); "
            f"got a {type(model).__name__} without a `peft_config`."
        )
    if adapter_name is not None and adapter_name not in peft_configs:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(peft_configs)}.")
    adapters = [adapter_name] if adapter_name else [n for n, c in peft_configs.items() if isinstance(c, LoraConfig)]
    if not adapters:
        raise ValueError("apply_allora found no LoRA adapter in the model's peft_config.")
    for name in adapters:
        check_lora_config(peft_configs[name])

    layers = [(n, m) for n, m in iter_lora_layers(model) if any(a in m.lora_A or a in m.lora_embedding_A for a in adapters)]
    if not layers:
        raise ValueError("apply_allora found no LoRA layers in the model: is `target_modules` matching any module?")
    supported = _supported_layer_types()
    unsupported = sorted({f"{type(m).__module__}.{type(m).__name__}" for _, m in layers if not isinstance(m, supported)})
    if unsupported:
        raise ValueError(
            "ALLoRA supports LoRA on linear layers only (peft `lora.Linear` and its bitsandbytes 4-/8-bit forms); "
            f"this model has LoRA layers of type {unsupported}. Restrict `target_modules` to linear layers."
        )
    for layer_name, layer in layers:
        for name in adapters:
            if name not in layer.lora_A:
                continue
            existing = layer.lora_variant.get(name)
            if existing is not None and not isinstance(existing, ALLoRALinearVariant):
                raise ValueError(
                    f"Layer {layer_name!r} adapter {name!r} already uses the peft LoRA variant "
                    f"{type(existing).__name__}; ALLoRA cannot be combined with it."
                )

    for name in adapters:
        peft_configs[name], _ = normalize_lora_config(peft_configs[name])
    for _, layer in layers:
        for name in adapters:
            if name not in layer.lora_A:
                continue
            layer.scaling[name] = 1.0
            layer.lora_alpha[name] = layer.r[name]
            layer.lora_dropout[name] = torch.nn.Identity()
            layer.lora_variant[name] = ALLoRALinearVariant(eta=eta, coefficient=coefficient)
    return model


def allora_variants(model: torch.nn.Module, adapter_name: str | None = None):
    """Yield the :class:`ALLoRALinearVariant` of every LoRA layer (for one adapter, or all)."""
    for _, layer in iter_lora_layers(model):
        for name, variant in layer.lora_variant.items():
            if isinstance(variant, ALLoRALinearVariant) and adapter_name in (None, name):
                yield variant


def allora_settings(model: torch.nn.Module, adapter_name: str = "default") -> ALLoRASettings | None:
    """The ALLoRA settings installed on ``adapter_name``, or None if it has no ALLoRA layers."""
    variant = next(allora_variants(model, adapter_name), None)
    return None if variant is None else ALLoRASettings(eta=variant.eta, coefficient=variant.coefficient)


def save_allora_config(settings: ALLoRASettings, save_directory: str | os.PathLike) -> str:
    """Write ``allora_config.json`` into ``save_directory`` (beside ``adapter_config.json``); return its path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, ALLORA_CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(settings), handle, indent=2)
        handle.write("\n")
    return path


def read_allora_config(directory: str | os.PathLike) -> ALLoRASettings:
    """Read ``allora_config.json`` from an adapter directory (eta and coefficient, validated)."""
    path = os.path.join(directory, ALLORA_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {ALLORA_CONFIG_NAME} in {directory}: it is not an ALLoRA adapter saved by allora-trl. "
            "It is still a plain LoRA adapter: load it with `peft.PeftModel.from_pretrained`."
        )
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return ALLoRASettings(eta=data.get("eta", DEFAULT_ETA), coefficient=data.get("coefficient", DEFAULT_COEFFICIENT))


def save_allora_adapter(model: PeftModel, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """``model.save_pretrained`` (plain LoRA) plus ``allora_config.json`` beside each ALLoRA adapter."""
    model.save_pretrained(save_directory, **save_kwargs)
    write_allora_configs(model, save_directory)


def write_allora_configs(model: torch.nn.Module, save_directory: str | os.PathLike) -> None:
    """Write ``allora_config.json`` for each ALLoRA adapter, in the folder where peft saves that adapter."""
    for name in getattr(model, "peft_config", {}):
        settings = allora_settings(model, name)
        if settings is not None:
            # peft saves the adapter named "default" at the top and any other one in a sub-folder of its name
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            save_allora_config(settings, folder)


def load_allora_adapter(
    model: torch.nn.Module, adapter_path: str | os.PathLike, is_trainable: bool = True, **kwargs
) -> PeftModel:
    """Load a saved ALLoRA adapter onto a base model and re-install ALLoRA with its saved settings.

    For inference this is not needed: the adapter is plain LoRA and ``PeftModel.from_pretrained`` gives the same
    outputs. Use this to continue training with the ALLoRA rule.
    """
    settings = read_allora_config(adapter_path)
    peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable, **kwargs)
    return apply_allora(peft_model, eta=settings.eta, coefficient=settings.coefficient)


def set_lora_scaling_one(model: torch.nn.Module, adapter_name: str) -> None:
    """Give ``adapter_name``'s LoRA layers ALLoRA's forward, ``W x + B A x``: scaling 1 and no dropout.

    Used on a passed-in peft model before a TRL trainer copies its adapter into a frozen reference adapter, so that
    the reference starts equal to the policy.
    """
    for _, layer in iter_lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.scaling[adapter_name] = 1.0
            layer.lora_alpha[adapter_name] = layer.r[adapter_name]
            layer.lora_dropout[adapter_name] = torch.nn.Identity()
