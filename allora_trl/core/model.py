"""Installing ALLoRA on a peft model, and saving / loading it beside a plain LoRA adapter.

An ALLoRA adapter is a LoRA adapter with ``lora_alpha == r`` (scaling 1) and ``lora_dropout == 0``: the
``adapter_config.json`` that peft writes is plain LoRA and loads anywhere a LoRA adapter loads. ALLoRA's own
settings, which matter only to continue training, go in ``allora_config.json`` beside it
(:mod:`allora_trl.core.settings`).
"""

from __future__ import annotations

import copy
import logging
import os

import torch


class _HoldBitsandbytesKernelNotice(logging.Filter):
    """Hold back bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" warning until 4-bit LoRA is used.

    Why it appears at all: peft imports bitsandbytes unconditionally (``peft/helpers.py``), and bitsandbytes, on CPUs
    with AVX512-BF16, tries at import to fetch an optional 4-bit kernel from the Hub and warns when it cannot, so
    every import of this package printed it. The warning matters only to 4-bit models: :func:`apply_allora` logs the
    held record when it meets a bitsandbytes 4-bit LoRA layer. Other bitsandbytes messages pass untouched.
    """

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"):
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.held:
            logging.getLogger(record.name).handle(record)
        self.held = []


_BNB_NOTICE = _HoldBitsandbytesKernelNotice()
_BNB_LOGGER = logging.getLogger("bitsandbytes.backends.cpu.ops")
_BNB_LOGGER.addFilter(_BNB_NOTICE)
try:  # the warning is emitted once, while peft's import imports bitsandbytes (hence imports after code: E402)
    from peft import LoraConfig, PeftModel  # noqa: E402
    from peft.tuners.lora import layer as lora_layer  # noqa: E402
finally:
    _BNB_LOGGER.removeFilter(_BNB_NOTICE)

from .coefficient_cache import CoefficientCache  # noqa: E402
from .settings import (  # noqa: E402
    DEFAULT_COEFFICIENT,
    DEFAULT_ETA,
    DEFAULT_SCALE,
    ALLoRASettings,
    read_allora_config,
    save_allora_config,
)
from .variant import ALLoRALinearVariant  # noqa: E402


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


def check_target_modules(
    model: torch.nn.Module, target_modules: str | list[str] | tuple[str, ...] | None, field_name: str = "target_modules"
) -> None:
    """Raise if a name listed in ``target_modules`` matches no module of ``model``, naming the names it has.

    peft only fails when *no* listed name matches: with ``["q_proj", "v_porj"]`` it trains ``q_proj`` alone and
    records the typo in ``adapter_config.json``. A name matches as peft matches it (the module's full name or its
    last dotted parts). A string (``"all-linear"`` or a regular expression) is left to peft. Works on the base model
    (before ``get_peft_model``) and on a peft model alike.
    """
    if target_modules is None or isinstance(target_modules, str):
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    adapter_parts = {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout"}
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if (isinstance(module, (torch.nn.Linear, lora_layer.LoraLayer)) or type(module).__name__ == "Conv1D")
            and not adapter_parts & set(name.split("."))
        }
    )
    raise ValueError(
        f"`{field_name}`: {', '.join(map(repr, missing))} match(es) no module of the model; its linear layers are "
        f"named {', '.join(linear) or '(none)'}. Correct the name(s), or use 'all-linear'."
    )


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
    scale: str = DEFAULT_SCALE,
) -> PeftModel:
    """Install ALLoRA on every LoRA layer of a peft model (all LoRA adapters, or only ``adapter_name``).

    Sets each layer's scaling to 1 and dropout to identity, installs :class:`ALLoRALinearVariant`, updates the
    model's ``LoraConfig`` to match (``lora_alpha == r``, ``alpha_pattern == rank_pattern``, ``lora_dropout == 0``)
    and returns the model. Raises for a model with no LoRA layers, for DoRA / rsLoRA / LoRA-bias adapters, and for
    LoRA layer types other than ``Linear`` (and peft's bitsandbytes 4-/8-bit ``Linear``), naming them.

    ``scale`` can only be ``"gradient"`` here (the paper's rule, which the layers run). ``scale="update"`` acts
    through the optimizer, which does not exist yet: install the rule here, then call
    :func:`~allora_trl.core.update_scaling.enable_update_scaling` on the optimizer, which records ``"update"`` on the
    layers it wires (so :func:`allora_settings` and ``allora_config.json`` never say ``"update"`` while only the
    gradient rule runs). ``ALLoRATrainer(args=ALLoRAConfig(allora_scale="update"))`` does both. Asking for
    ``"update"`` here raises, saying so.

    The adapter's layers share one :class:`~allora_trl.core.coefficient_cache.CoefficientCache`: the weight
    coefficient is computed once per optimizer step, not in every backward.

    Args:
        model (`PeftModel`): a peft model with at least one LoRA adapter on linear layers.
        eta (`float`, defaults to 2.0): the coefficient at ``B = 0``; finite, > 0.
        coefficient (`str`, defaults to ``"weight"``): ``"weight"`` (the paper's rule) or ``"output"`` (per token).
        adapter_name (`str`, *optional*): install on this adapter only; default: every LoRA adapter.
        scale (`str`, defaults to ``"gradient"``): must be ``"gradient"`` (see above).

    Returns:
        `PeftModel`: ``model`` itself, changed in place.
    """
    settings = ALLoRASettings(eta=eta, coefficient=coefficient, scale=scale)  # validates all three together
    if settings.scale != DEFAULT_SCALE:
        raise ValueError(
            f"apply_allora installs the gradient rule only; scale={settings.scale!r} acts through the optimizer: call "
            "apply_allora(model, ...) without `scale`, then allora_trl.core.update_scaling.enable_update_scaling("
            "optimizer, model) once the optimizer exists (it records the scale on the layers it wires), or train with "
            f"ALLoRATrainer(args=ALLoRAConfig(allora_scale={settings.scale!r})), which does both."
        )
    eta = settings.eta
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

    layers = [
        (n, m) for n, m in iter_lora_layers(model) if any(a in m.lora_A or a in m.lora_embedding_A for a in adapters)
    ]
    if not layers:
        raise ValueError("apply_allora found no LoRA layers in the model: is `target_modules` matching any module?")
    supported = _supported_layer_types()
    unsupported = sorted(
        {f"{type(m).__module__}.{type(m).__name__}" for _, m in layers if not isinstance(m, supported)}
    )
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

    if any(type(m).__name__ == "Linear4bit" for _, m in layers):
        _BNB_NOTICE.release()  # the held bitsandbytes 4-bit kernel warning concerns this model
    for name in adapters:
        peft_configs[name], _ = normalize_lora_config(peft_configs[name])
    for name in adapters:
        set_lora_scaling_one(model, name)
    cache = CoefficientCache()  # the adapter's weight coefficients, once per optimizer step
    for _, layer in layers:
        for name in adapters:
            if name in layer.lora_A:
                variant = ALLoRALinearVariant(eta=eta, coefficient=coefficient, scale=scale, cache=cache)
                layer.lora_variant[name] = variant
                cache.add(layer, name, variant)
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
    if variant is None:
        return None
    return ALLoRASettings(
        eta=variant.eta, coefficient=variant.coefficient, scale=getattr(variant, "scale", DEFAULT_SCALE)
    )


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
    outputs. Use this to continue training with the ALLoRA rule. ``allora_config.json`` is read (and any problem
    reported) before the adapter weights are loaded.

    The saved eta and coefficient are restored on the model (``allora_settings(model)`` returns them).
    ``scale="update"`` acts through the optimizer, which does not exist yet here: the layers run the gradient rule
    (and ``allora_settings`` says ``"gradient"``, with a warning) until it is wired; to continue such a run in your
    own loop::

        model = load_allora_adapter(base, path)
        if read_allora_config(path).scale == "update":
            enable_update_scaling(optimizer, model)   # allora_trl.core.update_scaling: now records "update"

    (``ALLoRATrainer`` takes the scale from its ``allora_scale`` argument and wires it itself.)

    Raises ``ValueError``, before loading any weight, for an ``adapter_config.json`` whose LoRA scaling is not 1
    (``lora_alpha != r``, or ``alpha_pattern != rank_pattern``): ALLoRA trains at scaling 1, so the adapter's outputs
    would change (``PeftModel.from_pretrained`` loads it as the plain LoRA it is).

    Args:
        model (`torch.nn.Module`): the base model the adapter was trained on.
        adapter_path (`str` or `os.PathLike`): the folder with ``adapter_config.json`` and ``allora_config.json``.
        is_trainable (`bool`, defaults to True): passed to ``PeftModel.from_pretrained``.
        **kwargs: passed to ``PeftModel.from_pretrained``.

    Returns:
        `PeftModel`: the model with the adapter loaded and the ALLoRA rule installed on it.
    """
    settings = read_allora_config(adapter_path)
    config_path = os.path.join(adapter_path, kwargs.get("subfolder") or "", "adapter_config.json")
    if os.path.isfile(config_path):  # else PeftModel.from_pretrained reports the missing file
        config = LoraConfig.from_pretrained(os.path.dirname(config_path))
        check_lora_config(config)  # DoRA, rsLoRA, LoRA bias
        scaled = [f"lora_alpha {config.lora_alpha} != r {config.r}"] if config.lora_alpha != config.r else []
        alpha_pattern, rank_pattern = dict(config.alpha_pattern or {}), dict(config.rank_pattern or {})
        if alpha_pattern != rank_pattern:
            scaled.append(f"alpha_pattern {alpha_pattern} != rank_pattern {rank_pattern}")
        if scaled:
            raise ValueError(
                f"{config_path}: {'; '.join(scaled)}, a LoRA scaling other than 1; ALLoRA trains at scaling 1, so "
                "loading this adapter as ALLoRA would change its outputs. Load it with "
                "`peft.PeftModel.from_pretrained` (plain LoRA), or merge it into the base (`merge_and_unload()`) and "
                "train a new ALLoRA adapter."
            )
    peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable, **kwargs)
    if settings.scale != DEFAULT_SCALE:
        logging.getLogger(__name__).warning(
            "%s was trained with scale=%r, which acts through the optimizer: the gradient rule runs (and is what "
            "allora_settings and a save record) until enable_update_scaling(optimizer, model) is called "
            "(allora_trl.core.update_scaling; ALLoRATrainer(allora_scale=%r) does it).",
            os.fspath(adapter_path),
            settings.scale,
            settings.scale,
        )
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
