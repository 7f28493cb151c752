"""ALLoRA's settings, in one place: their defaults, their checks and the ``allora_config.json`` format.

Three settings change training (``tests/test_settings_documented.py`` checks each is documented everywhere):

* ``eta``: the coefficient ``c_i = 1/sqrt(||(BA)_i|| + 1/eta^2)`` equals eta while ``B = 0``;
* ``coefficient``: ``"weight"`` (the paper's rule, one coefficient per output row) or ``"output"`` (its per-token
  ablation);
* ``scale``: ``"gradient"`` (the paper's rule) or ``"update"`` (this project's extension: the coefficient scales the
  optimizer's update, :mod:`allora_trl.core.update_scaling`).

An ALLoRA adapter is a plain LoRA adapter (``adapter_config.json`` with ``lora_alpha == r``, dropout 0); the
settings go beside it in ``allora_config.json``::

    {"format_version": 1, "eta": 2.0, "coefficient": "weight", "scale": "gradient", "paper": "arXiv:2410.09692"}

Every key but ``paper`` is required; unknown keys are an error, not ignored. ``format_version`` lets a later
version read (or refuse, naming the fix) what this one wrote. This module imports nothing from the rest of the
package, so every other module can import it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch

ALLORA_CONFIG_NAME = "allora_config.json"
ALLORA_CONFIG_FORMAT_VERSION = 1
PAPER = "arXiv:2410.09692"

COEFFICIENTS = ("weight", "output")
SCALES = ("gradient", "update")
DEFAULT_ETA = 2.0
DEFAULT_COEFFICIENT = "weight"
DEFAULT_SCALE = "gradient"

# The coefficient is computed in float32: eta must be a normal float32 number for ``c <= eta`` to be represented.
ETA_MIN = torch.finfo(torch.float32).tiny  # about 1.2e-38
ETA_MAX = torch.finfo(torch.float32).max  # about 3.4e38


def validate_eta(eta: float, field_name: str = "eta") -> float:
    """Return ``eta`` as a float, or raise naming the field.

    eta must be a number (a bool is not: YAML's ``true`` would otherwise become 1.0), finite, > 0, and within
    float32's normal range (about 1.2e-38 to 3.4e38), because the coefficient, which reaches eta at B = 0, is
    computed in float32.
    """
    if isinstance(eta, bool):
        raise ValueError(f"`{field_name}` must be a number such as 2.0 (the paper's default), got the boolean {eta!r}.")
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"`{field_name}` must be a positive finite number (e.g. 2.0), got {eta!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{field_name}` must be a positive finite number (e.g. 2.0, the paper's default), got {eta!r}."
        )
    if not ETA_MIN <= value <= ETA_MAX:
        raise ValueError(
            f"`{field_name}` must lie between {ETA_MIN:.3g} and {ETA_MAX:.3g} (the coefficient, which equals eta at "
            f"B = 0, is computed in float32), got {eta!r}. The paper uses 2.0; useful values are of order 1."
        )
    return value


def validate_choice(value: str, choices: dict[str, str], field_name: str) -> str:
    """Return ``value`` if it is a key of ``choices`` (name -> what it means), else raise naming field and choices."""
    if value not in choices:
        names = ", ".join(map(repr, choices))
        meanings = "; ".join(f"{name!r}: {meaning}" for name, meaning in choices.items())
        raise ValueError(f"`{field_name}` must be one of {names} ({meanings}), got {value!r}.")
    return value


_COEFFICIENT_MEANINGS = {"weight": "the paper's rule", "output": "its per-token ablation"}
_SCALE_MEANINGS = {
    "gradient": "the paper's rule: c scales the LoRA gradients",
    "update": "allora-trl's extension: c scales the optimizer's update",
}


def validate_coefficient(coefficient: str, field_name: str = "coefficient") -> str:
    """Return ``coefficient`` if it is one of ``COEFFICIENTS``, else raise naming the field and the choices."""
    return validate_choice(coefficient, _COEFFICIENT_MEANINGS, field_name)


def validate_scale(scale: str, field_name: str = "scale") -> str:
    """Return ``scale`` if it is one of ``SCALES``, else raise naming the field and the choices."""
    return validate_choice(scale, _SCALE_MEANINGS, field_name)


def validate_settings(eta, coefficient: str, scale: str, prefix: str = "") -> float:
    """Check ALLoRA's three settings together, naming each field as ``prefix + name``; return eta as a float.

    The one check behind both :class:`ALLoRASettings` (``eta``...) and the trainer configs (``allora_eta``...).
    """
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

    Args:
        eta (`float`, defaults to 2.0): the coefficient's value at ``B = 0``; finite, > 0.
        coefficient (`str`, defaults to ``"weight"``): ``"weight"`` or ``"output"``.
        scale (`str`, defaults to ``"gradient"``): ``"gradient"`` or ``"update"`` (needs ``coefficient="weight"``).
        paper (`str`): the paper the rule comes from.
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
        """Settings from parsed ``allora_config.json`` content; every error names ``source`` and the fix."""
        fix = "re-save the adapter with allora-trl (save_allora_adapter / ALLoRATrainer.save_model) or edit the file"
        if not isinstance(data, dict):
            kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
                type(data), "null"
            )
            raise ValueError(f"{source}: expected a JSON object such as {_example()}, got a JSON {kind}; {fix}.")
        data = dict(data)
        version = data.pop("format_version", None)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are format_version, "
                f"{', '.join(names)}. Correct or remove them."
            )
        if version is None:
            raise ValueError(
                f'{source}: "format_version" is missing; add "format_version": {ALLORA_CONFIG_FORMAT_VERSION}.'
            )
        if type(version) is int and version > ALLORA_CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} was written by a newer allora-trl (this one reads up to "
                f"{ALLORA_CONFIG_FORMAT_VERSION}): upgrade allora-trl."
            )
        if type(version) is not int or version != ALLORA_CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version must be {ALLORA_CONFIG_FORMAT_VERSION}, got {version!r}; {fix}."
            )
        missing = sorted({"eta", "coefficient", "scale"} - set(data))
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(map(repr, missing))}, e.g. {_example()}; {fix}.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None


def _example() -> str:
    return json.dumps(ALLoRASettings().to_json_dict())


def save_allora_config(settings: ALLoRASettings, save_directory: str | os.PathLike) -> str:
    """Write ``allora_config.json`` into ``save_directory`` (beside ``adapter_config.json``); return its path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, ALLORA_CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings.to_json_dict(), handle, indent=2)
        handle.write("\n")
    return path


def read_allora_config(directory: str | os.PathLike) -> ALLoRASettings:
    """Read and validate ``allora_config.json`` from an adapter directory.

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


def check_resume_settings(
    checkpoint: str | os.PathLike, wanted: ALLoRASettings, adapter_name: str = "default", prefix: str = "allora_"
) -> ALLoRASettings | None:
    """Raise ``ValueError`` if a checkpoint was trained with other ALLoRA settings than ``wanted``; return its settings.

    Resuming continues the checkpoint's weights, optimizer state and schedule: with another eta, coefficient or scale
    it would silently become another run, whose records show only the new values. The message names each differing
    field (as ``prefix + name``) with both values, and the two fixes. ``adapter_name``'s ``allora_config.json`` is
    read where peft saves that adapter (the checkpoint folder for ``"default"``, else its sub-folder). Returns None
    when there is no ``allora_config.json`` there (a checkpoint not written by an ALLoRA run: the caller says so).
    """
    folder = os.fspath(checkpoint) if adapter_name == "default" else os.path.join(checkpoint, adapter_name)
    if not os.path.isfile(os.path.join(folder, ALLORA_CONFIG_NAME)):
        return None
    saved = read_allora_config(folder)
    names = [f.name for f in fields(ALLoRASettings) if f.name != "paper"]
    differ = [name for name in names if getattr(saved, name) != getattr(wanted, name)]
    if differ:
        was = ", ".join(f"{prefix}{name}={getattr(saved, name)!r}" for name in differ)
        now = ", ".join(f"{prefix}{name}={getattr(wanted, name)!r}" for name in differ)
        raise ValueError(
            f"Cannot resume from {os.fspath(checkpoint)!r}: it was trained with {was}, this run sets {now}. Resume "
            f"with {was} (the checkpoint's), or train with {now} from the start (without resume_from_checkpoint, "
            "in a new output_dir)."
        )
    return saved
