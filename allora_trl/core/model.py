"""Installing ALLoRA on a peft model, and saving / loading its settings beside a plain LoRA adapter.

An ALLoRA adapter is a LoRA adapter with ``lora_alpha == r`` (scaling 1) and ``lora_dropout == 0``: the
``adapter_config.json`` that peft writes is plain LoRA and loads anywhere a LoRA adapter loads. ALLoRA's own
settings (eta, coefficient, scale), which matter only to continue training, go in ``allora_config.json`` beside it,
with a ``format_version`` so that later versions can read (or refuse, naming the fix) what earlier ones wrote.

``allora_config.json`` formats:

* version 1 (this one): ``{"format_version": 1, "eta": float, "coefficient": "weight"|"output",
  "scale": "gradient"|"update", "paper": "arXiv:2410.09692"}``; every key but ``paper`` is required.
* version 0 (allora-trl 0.1.0 before the format had a version): ``{"eta", "coefficient", "paper"}``, no
  ``format_version``. It did not record the scale; such files load with ``scale="gradient"``, the paper's rule.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, fields

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

from .gradient import validate_coefficient, validate_eta  # noqa: E402
from .variant import ALLoRALinearVariant  # noqa: E402

ALLORA_CONFIG_NAME = "allora_config.json"
ALLORA_CONFIG_FORMAT_VERSION = 1
DEFAULT_ETA = 2.0
DEFAULT_COEFFICIENT = "weight"
DEFAULT_SCALE = "gradient"
PAPER = "arXiv:2410.09692"
# Keys of the unversioned files written before format_version existed (see the module docstring).
_VERSION_0_KEYS = {"eta", "coefficient", "paper"}


def validate_settings(eta, coefficient: str, scale: str, prefix: str = "") -> float:
    """Check ALLoRA's three settings together, naming each field as ``prefix + name``; return eta as a float.

    The one check behind both ``ALLoRASettings`` (``eta``...) and the trainer configs (``allora_eta``...).
    """
    # update_scaling imports this module (for iter_lora_layers), so its validator is imported when first needed.
    from .update_scaling import validate_scale

    eta = validate_eta(eta, f"{prefix}eta")
    validate_coefficient(coefficient, f"{prefix}coefficient")
    validate_scale(scale, f"{prefix}scale")
    if scale == "update" and coefficient != "weight":
        raise ValueError(
            f"`{prefix}scale='update'` needs `{prefix}coefficient='weight'`: a per-token coefficient cannot be moved "
            f"from the gradient to the update. Set {prefix}coefficient='weight' or {prefix}scale='gradient'."
        )
    return eta


@dataclass(frozen=True)
class ALLoRASettings:
    """Every ALLoRA setting that changes training: what ``allora_config.json`` holds (``paper`` is informative).

    ``scale`` is ``"gradient"`` (the paper's rule) or ``"update"`` (allora-trl's extension, carried out by optimizer
    hooks: :func:`~allora_trl.core.update_scaling.enable_update_scaling`), which needs ``coefficient="weight"``.
    """

    eta: float = DEFAULT_ETA
    coefficient: str = DEFAULT_COEFFICIENT
    scale: str = DEFAULT_SCALE
    paper: str = PAPER

    def __post_init__(self):
        object.__setattr__(self, "eta", validate_settings(self.eta, self.coefficient, self.scale))

    def to_json_dict(self) -> dict:
        """The ``allora_config.json`` content: the settings plus ``format_version``."""
        return {"format_version": ALLORA_CONFIG_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json_dict(cls, data, source: str = ALLORA_CONFIG_NAME) -> ALLoRASettings:
        """Settings from parsed ``allora_config.json`` content (either format); errors name ``source`` and the fix.

        A file without ``format_version`` is read as version 0 (eta and coefficient required, scale taken as
        "gradient") only if it has no version-1 key; unknown keys are an error in both, not silently ignored.
        """
        fix = "re-save the adapter with allora-trl (save_allora_adapter / ALLoRATrainer.save_model) or edit the file"
        if not isinstance(data, dict):
            kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
                type(data), "null"
            )
            raise ValueError(f"{source}: expected a JSON object such as {_example()}, got a JSON {kind}; {fix}.")
        data = dict(data)
        version = data.pop("format_version", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are format_version, "
                f"{', '.join(f.name for f in fields(cls))}. Correct or remove them."
            )
        if version is None and set(data) <= _VERSION_0_KEYS:
            required = {"eta", "coefficient"}  # an unversioned file of allora-trl 0.1.0: no scale recorded
        elif version is None:
            raise ValueError(
                f'{source}: "format_version" is missing; add "format_version": {ALLORA_CONFIG_FORMAT_VERSION}.'
            )
        elif type(version) is int and version > ALLORA_CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} was written by a newer allora-trl (this one reads up to "
                f"{ALLORA_CONFIG_FORMAT_VERSION}): upgrade allora-trl (pip install -U allora-trl)."
            )
        elif version != ALLORA_CONFIG_FORMAT_VERSION or type(version) is not int:
            raise ValueError(
                f"{source}: format_version must be {ALLORA_CONFIG_FORMAT_VERSION}, got {version!r}; {fix}."
            )
        else:
            required = {"eta", "coefficient", "scale"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(map(repr, missing))}, e.g. {_example()}; {fix}.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None


def _example() -> str:
    return json.dumps(ALLoRASettings().to_json_dict())


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

    ``scale`` is recorded on the layers (so :func:`allora_settings` and ``allora_config.json`` report it) but not
    acted on here: ``scale="update"`` also needs :func:`~allora_trl.core.update_scaling.enable_update_scaling` on
    the optimizer, which ``ALLoRATrainer`` does itself.
    """
    settings = ALLoRASettings(eta=eta, coefficient=coefficient, scale=scale)  # validates all three together
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
    for _, layer in layers:
        for name in adapters:
            if name in layer.lora_A:
                layer.lora_variant[name] = ALLoRALinearVariant(eta=eta, coefficient=coefficient, scale=scale)
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


def save_allora_config(settings: ALLoRASettings, save_directory: str | os.PathLike) -> str:
    """Write ``allora_config.json`` into ``save_directory`` (beside ``adapter_config.json``); return its path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, ALLORA_CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings.to_json_dict(), handle, indent=2)
        handle.write("\n")
    return path


def read_allora_config(directory: str | os.PathLike) -> ALLoRASettings:
    """Read and validate ``allora_config.json`` from an adapter directory (both formats: see the module docstring).

    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for a file that is not valid JSON,
    not an object, has unknown or missing keys or bad values; every message names the file and the fix.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Adapter folder {os.fspath(directory)!r} does not exist (or is not a folder).")
    path = os.path.join(directory, ALLORA_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {ALLORA_CONFIG_NAME} in {os.fspath(directory)!r}: it is not an ALLoRA adapter saved by allora-trl. "
            "If it holds a LoRA adapter (adapter_config.json), load it with `peft.PeftModel.from_pretrained`."
        )
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file or "
                "re-save the adapter with allora-trl."
            ) from None
    return ALLoRASettings.from_json_dict(data, source=path)


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

    Every saved setting is restored on the model: ``allora_settings(model)`` returns them. ``scale="update"`` acts
    through the optimizer, which does not exist yet here; to continue such a run in your own loop::

        model = load_allora_adapter(base, path)
        if allora_settings(model).scale == "update":
            enable_update_scaling(optimizer, model)   # allora_trl.core.update_scaling

    (``ALLoRATrainer`` takes the scale from its ``allora_scale`` argument instead.)
    """
    settings = read_allora_config(adapter_path)
    peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable, **kwargs)
    return apply_allora(peft_model, eta=settings.eta, coefficient=settings.coefficient, scale=settings.scale)


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
