"""Config args of the ALLoRA Axolotl plugin: ``allora_eta``, ``allora_coefficient``, and the ``adapter: allora`` rules.

Axolotl merges this model into its own config model (``AxolotlInputConfig``) when the plugin is listed under
``plugins:``. It imports nothing from Axolotl at import time, so it can be validated and tested without an Axolotl
install (only the fused kernels' automatic switch-on asks Axolotl's own rule, where Axolotl is installed).

With ``adapter: allora`` the validator below fills the LoRA settings ALLoRA fixes (``lora_alpha = lora_r``,
``lora_dropout = 0``), routes ``load_in_4bit`` / ``load_in_8bit`` to a bitsandbytes config that Axolotl's loader
applies to any adapter name, and rejects settings that would silently change the ALLoRA rule or that are not
supported with it, each with a message that names the field and the fix. With any other adapter it changes nothing.
"""

from __future__ import annotations

import difflib
import logging
import os
from importlib import metadata
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from allora_trl.core.settings import (
    ALLORA_CONFIG_NAME,
    COEFFICIENTS,
    DEFAULT_COEFFICIENT,
    DEFAULT_SCALE,
    read_allora_config,
    validate_coefficient,
    validate_eta,
)

LOG = logging.getLogger(__name__)

ADAPTER_NAME = "allora"

# Axolotl's fused LoRA kernels replace the attention / MLP forward of a LoRA layer by their own autograd functions,
# which never call peft's LoRA variant; with adapter: allora the plugin swaps in ALLoRA's versions of the three
# below (kernels.py), written for Axolotl 0.19's kernel API. The embedding kernel has nothing to run on: ALLoRA
# trains linear layers only (apply_allora refuses LoRA on embeddings).
ALLORA_KERNEL_FIELDS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
_LORA_KERNEL_FIELDS = (*ALLORA_KERNEL_FIELDS, "lora_embedding_kernel")
KERNELS_AXOLOTL = "0.19"  # the Axolotl version whose kernel API integrations/axolotl/kernels.py is written against


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


# `rl:` modes trained with adapter: allora. dpo, kto and simpo (TRL's CPO trainer with the SimPO loss) are trained
# end to end in tests/axolotl; ipo is dpo's trainer with another loss. Each refused mode maps to why, for the
# validation message.
SUPPORTED_RL = ("dpo", "ipo", "kto", "simpo")
_REFUSED_RL = {
    "grpo": "Axolotl's GRPO trainers generate completions during training (usually through vLLM on a GPU), a path "
    "not verified with ALLoRA",
    "gdpo": "it runs Axolotl's GRPO trainer, which generates completions during training (usually through vLLM on a "
    "GPU), a path not verified with ALLoRA",
    "ebft": "Axolotl's EBFT trainer generates completions during training, a path not verified with ALLoRA",
    "orpo": "Axolotl's ORPO runs its own dataset pipeline and TRL's ORPO trainer, a path not verified with ALLoRA",
}


def _compute_dtype_name(data: dict) -> str:
    """The dtype Axolotl will load the model in, as ``axolotl.utils.config.resolve_dtype`` decides it after validation.

    The 4-bit layers compute in this dtype (as Axolotl's own ``adapter: qlora`` does), so inputs are not cast up or
    down at every quantised layer. ``bf16: auto`` means bf16 where the GPU supports it, else fp16 (Axolotl's rule).
    """
    bf16, fp16 = data.get("bf16"), data.get("fp16")
    if bf16 == "auto" and not fp16:
        from transformers.utils import is_torch_bf16_gpu_available

        if is_torch_bf16_gpu_available():
            bf16 = True
        else:
            bf16 = False
            fp16 = True if fp16 is None and not data.get("float16") else fp16
    if bf16 is True or data.get("bfloat16"):
        return "bfloat16"
    if data.get("load_in_8bit") or fp16 is True or data.get("float16"):
        return "float16"
    return "float32"


def _fill_quantization(data: dict) -> list[str]:
    """With ``load_in_4bit`` / ``load_in_8bit``, put the bitsandbytes settings where Axolotl's loader reads them.

    Axolotl 0.19 builds a ``BitsAndBytesConfig`` only for its own ``qlora`` (4-bit) and ``lora`` (8-bit) adapter
    names (``ModelLoader._set_quantization_config``), but every adapter's ``from_pretrained`` receives the config's
    ``model_kwargs`` (``overrides_of_model_kwargs``). Filling ``model_kwargs.quantization_config`` with the settings
    Axolotl uses for ``qlora`` (nf4, double quantisation, the run's compute dtype, then ``bnb_config_kwargs``) or for
    8-bit ``lora`` makes ``adapter: allora`` load the same quantised base; the plugin's ``post_model_build`` then runs
    ``prepare_model_for_kbit_training`` as Axolotl does for its own names. Returns the problems found.
    """
    four, eight = _is_set(data.get("load_in_4bit")), _is_set(data.get("load_in_8bit"))
    problems = []
    if _is_set(data.get("gptq")):
        problems.append(
            "`gptq` is not supported with adapter: allora (ALLoRA is implemented for peft's plain and bitsandbytes LoRA "
            "layers, not its GPTQ ones). "
            "Remove `gptq` and train on a 16/32-bit or bitsandbytes (`load_in_4bit: true`) base, or use "
            "`adapter: lora` with `gptq: true` for plain LoRA."
        )
    if not (four or eight):
        return problems
    if four and eight:
        problems.append("`load_in_4bit` and `load_in_8bit` are both true: set only one of them.")
        return problems
    if data.get("fsdp") or data.get("fsdp_config"):
        problems.append(
            f"`load_in_{4 if four else 8}bit` with FSDP is not supported with adapter: allora (Axolotl's quantised "
            "FSDP loading is reserved for `adapter: qlora`). Remove `fsdp` / `fsdp_config` (single GPU, DDP or "
            "DeepSpeed ZeRO-1/2), or train a 16/32-bit base under FSDP2."
        )
        return problems
    if four:
        quantization = {
            "load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_compute_dtype": _compute_dtype_name(data),
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_quant_storage": "bfloat16",
            **dict(data.get("bnb_config_kwargs") or {}),
        }
    else:
        quantization = {"load_in_8bit": True}
    key = "overrides_of_model_kwargs" if "overrides_of_model_kwargs" in data else "model_kwargs"
    model_kwargs = dict(data.get(key) or {})
    existing = model_kwargs.get("quantization_config")
    if existing is not None and dict(existing) != quantization:  # equal: a config validated a second time
        problems.append(
            f"`{key}.quantization_config` cannot be combined with `load_in_{4 if four else 8}bit` with adapter: allora "
            "(the plugin fills it from `load_in_4bit` / `load_in_8bit` and `bnb_config_kwargs`). Remove "
            f"`{key}.quantization_config` (put extra bitsandbytes settings in `bnb_config_kwargs`)."
        )
        return problems
    model_kwargs["quantization_config"] = quantization
    data[key] = model_kwargs
    return problems


def _check_rl(data: dict) -> list[str]:
    rl = data.get("rl")
    rl = getattr(rl, "value", rl)  # an RLType enum when the config was validated before
    if rl == "simpo" and data.get("simpo_gamma") is None:
        # Axolotl 0.19 passes simpo_gamma=None on to TRL's CPO trainer, which fails at the first step (None / beta)
        return ["`rl: simpo` needs `simpo_gamma` (SimPO's target reward margin, e.g. `simpo_gamma: 0.5`)."]
    if not rl or rl in SUPPORTED_RL:
        return []
    reason = _REFUSED_RL.get(str(rl), "it is not verified with ALLoRA")
    return [
        f"`rl: {rl}` is not supported with adapter: allora ({reason}). Use `rl: dpo` (or ipo / kto / simpo) with "
        f"adapter: allora, or `adapter: lora` for `rl: {rl}`."
    ]


# Every ``allora_*`` key the plugin knows (``allora_scale`` only to refuse it with a reason): any other is a typo.
ALLORA_KEYS = ("allora_eta", "allora_coefficient", "allora_scale")


def _check_unknown_keys(data: dict) -> list[str]:
    """An ``allora_*`` key the plugin does not know (``allora_eat: 4``) would be ignored, training at the default:
    each is a problem naming the key and the nearest known one."""
    problems = []
    for key in sorted(k for k in data if isinstance(k, str) and k.startswith("allora_") and k not in ALLORA_KEYS):
        # compared without the common "allora_" prefix, which would make every key look near
        names = {k.removeprefix("allora_"): k for k in ALLORA_KEYS}
        nearest = difflib.get_close_matches(key.removeprefix("allora_"), names, n=1, cutoff=0.6)
        hint = f"did you mean `{names[nearest[0]]}`?" if nearest else f"its keys are {', '.join(ALLORA_KEYS[:2])}."
        problems.append(f"`{key}` is not a setting of the ALLoRA plugin: {hint} Correct or remove it.")
    return problems


def _check_scale(data: dict) -> list[str]:
    """The plugin trains the paper's rule only: ``allora_scale: update`` needs the optimizer hooks of allora-trl's
    TRL trainers. Refused in the YAML and in an adapter to be continued (``lora_model_dir``), never dropped."""
    problems = []
    scale = data.get("allora_scale")
    if scale is not None and scale != DEFAULT_SCALE:
        problems.append(
            f"`allora_scale: {scale}` is not supported by the Axolotl plugin, which trains the paper's rule "
            f"(`{DEFAULT_SCALE}`). Remove `allora_scale`, or train with allora-trl's `ALLoRATrainer` "
            f"(`ALLoRAConfig(allora_scale={scale!r})`)."
        )
    model_dir = data.get("lora_model_dir")
    if model_dir and os.path.isfile(os.path.join(str(model_dir), ALLORA_CONFIG_NAME)):
        try:
            saved = read_allora_config(model_dir)
        except ValueError as exc:
            problems.append(f"`lora_model_dir`: {exc}")
        else:
            if saved.scale != DEFAULT_SCALE:
                problems.append(
                    f"`lora_model_dir` holds an adapter trained with allora_scale={saved.scale!r} (its "
                    f"{ALLORA_CONFIG_NAME}); the Axolotl plugin trains with `{DEFAULT_SCALE}` only, so continuing it "
                    "here would change its rule. Continue it with allora-trl's `ALLoRATrainer`, or start a new "
                    "adapter (remove `lora_model_dir`)."
                )
    return problems


def _axolotl_version() -> str | None:
    """The installed Axolotl's version, read from its package metadata (Axolotl itself is not imported)."""
    try:
        return metadata.version("axolotl")
    except metadata.PackageNotFoundError:
        return None


def _kernels_supported(version: str | None) -> bool:
    return version is not None and (version == KERNELS_AXOLOTL or version.startswith(KERNELS_AXOLOTL + "."))


def kernel_version_problem(fields) -> str | None:
    """Why the fused kernels ``fields`` cannot run with the installed Axolotl, naming the fix; None if they can.

    The one version check, used at validation (:func:`check_allora_config`) and when the plugin installs the
    kernels (``kernels.check_axolotl_version``).
    """
    version = _axolotl_version()
    if _kernels_supported(version):
        return None
    fix = " and ".join(f"`{k}: false`" for k in fields)
    names = ", ".join(f"`{k}`" for k in fields)
    found = f"Axolotl {version}" if version else "no Axolotl installation"
    return (
        f"{names} with adapter: allora needs Axolotl {KERNELS_AXOLOTL} (ALLoRA's versions of its fused LoRA "
        f"kernels are written against its kernel API, which changes between versions); found {found}. "
        f"Set {fix}, or install axolotl=={KERNELS_AXOLOTL}.*."
    )


def _coefficient(data: dict) -> str:
    """The coefficient this run trains with: the config's, else the one saved in ``lora_model_dir``, else weight."""
    coefficient = data.get("allora_coefficient")
    model_dir = data.get("lora_model_dir")
    if coefficient is None and model_dir and os.path.isfile(os.path.join(str(model_dir), ALLORA_CONFIG_NAME)):
        try:
            coefficient = read_allora_config(model_dir).coefficient
        except ValueError:
            coefficient = None  # reported by _check_scale
    return coefficient or DEFAULT_COEFFICIENT


def _auto_kernels(data: dict) -> dict[str, bool]:
    """The fused kernels Axolotl would switch on by itself were this ``adapter: lora`` (``qlora`` with 4 bits).

    Asks Axolotl's own rule (``AxolotlConfigWCapabilities.check_auto_enable_lora_kernels``) on a copy of the config,
    and only where a GPU was detected (Axolotl's ``capabilities``), the installed Axolotl is the one ALLoRA's kernels
    are written for, and the coefficient is ``weight``: the kernels allocate on CUDA (Triton activations, CUDA
    dequantisation), so on a machine without one they stay off, as does everything Axolotl's rule leaves off
    (``rl``, 8-bit bases, ``trust_remote_code``, FSDP1 on several GPUs, architectures it marks unsupported).
    """
    capabilities = data.get("capabilities") or {}
    if not capabilities.get("compute_capability") or _coefficient(data) != "weight":
        return {}
    if not _kernels_supported(_axolotl_version()):
        return {}
    try:
        from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
    except ImportError:
        return {}
    probe = {k: v for k, v in data.items() if k not in _LORA_KERNEL_FIELDS}
    probe["adapter"] = "qlora" if _is_set(data.get("load_in_4bit")) else "lora"
    decided = AxolotlConfigWCapabilities.check_auto_enable_lora_kernels(probe)
    enabled = {k: True for k in ALLORA_KERNEL_FIELDS if decided.get(k)}
    if enabled:
        LOG.info("adapter: allora: switching on %s, as Axolotl does for adapter: lora here.", sorted(enabled))
    return enabled


def _check_kernels(data: dict) -> list[str]:
    """Fill the fused-kernel switches (Axolotl's own choice for ``adapter: lora`` when none is set, else false) and
    refuse the combinations ALLoRA's kernels do not cover, naming the fix ``lora_*_kernel: false``."""
    if all(data.get(k) is None for k in _LORA_KERNEL_FIELDS):
        data.update(_auto_kernels(data))
    for key in _LORA_KERNEL_FIELDS:
        if data.get(key) is None:
            data[key] = False
    on = [k for k in ALLORA_KERNEL_FIELDS if data.get(k)]
    if not on:
        return []
    fix = " and ".join(f"`{k}: false`" for k in on)
    names = ", ".join(f"`{k}`" for k in on)
    version_problem = kernel_version_problem(on)
    if version_problem:
        return [version_problem]
    problems = []
    coefficient = _coefficient(data)
    if coefficient != "weight":
        problems.append(
            f"{names} with adapter: allora need `allora_coefficient: weight` (the per-token `{coefficient}` "
            f"coefficient cannot run in the fused kernels). Set `allora_coefficient: weight`, or set {fix}."
        )
    if _is_set(data.get("load_in_8bit")):
        problems.append(
            f"{names} cannot be combined with `load_in_8bit` (Axolotl's fused kernels do not dequantise 8-bit "
            f"bases; it refuses them for 8-bit `adapter: lora` too). Set {fix}, or use `load_in_4bit`."
        )
    rl = data.get("rl")
    rl = getattr(rl, "value", rl)
    if rl:
        problems.append(
            f"{names} with adapter: allora and `rl: {rl}` is not verified (Axolotl does not switch its kernels on "
            f"for `rl` either). Set {fix}."
        )
    return problems


def check_allora_config(data: dict) -> dict:
    """Return a copy of a raw Axolotl config with ALLoRA's LoRA settings filled, or raise listing every problem.

    Only acts when ``adapter == "allora"``. Fills an unset ``lora_alpha`` with ``lora_r``, an unset
    ``lora_alpha_pattern`` with ``lora_rank_pattern``, an unset ``lora_dropout`` with 0, unset fused-kernel
    switches (:func:`_check_kernels`: as Axolotl would set them for ``adapter: lora`` on a GPU, else false) and, with ``load_in_4bit`` / ``load_in_8bit``, ``model_kwargs.quantization_config`` (see
    :func:`_fill_quantization`). Refuses the ``rl`` modes not in :data:`SUPPORTED_RL`, naming why and what to use,
    and ``allora_*`` keys the plugin does not know, naming the nearest known one.
    Idempotent: a config it filled passes again unchanged.
    """
    if not isinstance(data, dict) or data.get("adapter") != ADAPTER_NAME:
        return data
    data = dict(data)
    problems: list[str] = []

    r = data.get("lora_r")
    if r is None or isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        problems.append(f"`lora_r` must be a positive integer (the LoRA rank, e.g. `lora_r: 16`), got {r!r}.")
        r = None

    alpha = data.get("lora_alpha")
    if alpha is None:
        if r is not None:
            data["lora_alpha"] = r
    elif r is not None and alpha != r:
        problems.append(
            f"`lora_alpha` must equal `lora_r` with adapter: allora (ALLoRA fixes the LoRA scaling "
            f"lora_alpha/lora_r at 1; its adaptive coefficient replaces the scaling): got lora_alpha={alpha!r}, "
            f"lora_r={r}. Remove `lora_alpha` or set `lora_alpha: {r}`."
        )

    rank_pattern = dict(data.get("lora_rank_pattern") or {})
    alpha_pattern = data.get("lora_alpha_pattern")
    if not alpha_pattern:
        if rank_pattern:
            data["lora_alpha_pattern"] = rank_pattern
    elif dict(alpha_pattern) != rank_pattern:
        problems.append(
            "`lora_alpha_pattern` must equal `lora_rank_pattern` with adapter: allora (every layer needs "
            f"alpha == its rank, i.e. scaling 1): got lora_alpha_pattern={dict(alpha_pattern)!r}, "
            f"lora_rank_pattern={rank_pattern!r}. Remove `lora_alpha_pattern`; it is filled from `lora_rank_pattern`."
        )

    dropout = data.get("lora_dropout")
    if dropout is None:
        data["lora_dropout"] = 0.0
    elif dropout != 0:
        problems.append(
            f"`lora_dropout` must be 0 with adapter: allora (ALLoRA replaces LoRA dropout; the paper trains "
            f"without it): got {dropout!r}. Remove `lora_dropout` or set `lora_dropout: 0`."
        )

    if _is_set(data.get("peft_use_dora")):
        problems.append(
            "`peft_use_dora` cannot be combined with adapter: allora (DoRA's magnitude vector has no place in the "
            "ALLoRA rule). Remove `peft_use_dora`, or use `adapter: lora` with `peft_use_dora: true` to train DoRA."
        )
    if _is_set(data.get("peft_use_rslora")):
        problems.append(
            "`peft_use_rslora` cannot be combined with adapter: allora (rsLoRA's lora_alpha/sqrt(lora_r) scaling "
            "would replace ALLoRA's fixed scaling of 1). Remove `peft_use_rslora`."
        )
    problems.extend(_fill_quantization(data))
    problems.extend(_check_rl(data))
    problems.extend(_check_scale(data))
    problems.extend(_check_unknown_keys(data))
    if data.get("lora_target_parameters"):
        problems.append(
            "`lora_target_parameters` is not supported with adapter: allora (ALLoRA is implemented for LoRA on "
            "linear layers; peft wraps raw parameters such as fused MoE experts differently). Remove it and target "
            "linear modules with `lora_target_modules` / `lora_target_linear`."
        )
    problems.extend(_check_kernels(data))

    if problems:
        raise ValueError("adapter: allora: " + " | ".join(problems))
    return data


class ALLoRAArgs(BaseModel):
    """Input args of the ALLoRA plugin (``allora_trl.integrations.axolotl.ALLoRAPlugin``)."""

    allora_eta: float | None = Field(
        default=None,
        json_schema_extra={
            "description": "ALLoRA's eta: the coefficient is 1/sqrt(||(BA)_i|| + 1/eta^2), so at most eta. "
            "A positive finite number; default 2.0 (the paper's), or the value saved in `lora_model_dir`."
        },
    )
    allora_coefficient: str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Which coefficient ALLoRA uses: `weight` (the paper's rule, per output row of BA) or "
            "`output` (the paper's per-token ablation). Default `weight`, or the value saved in `lora_model_dir`."
        },
    )

    @field_validator("allora_eta", mode="before")
    @classmethod
    def _check_eta(cls, value):
        if value is None:
            return value
        return validate_eta(value, "allora_eta")  # refuses YAML's `true` too

    @field_validator("allora_coefficient", mode="before")
    @classmethod
    def _check_coefficient(cls, value):
        if value is None:
            return value
        return validate_coefficient(value, "allora_coefficient")

    @model_validator(mode="before")
    @classmethod
    def check_allora_adapter(cls, data):
        """Fill and check the LoRA settings ALLoRA fixes; see :func:`check_allora_config`."""
        if isinstance(data, dict) and data.get("adapter") != ADAPTER_NAME:
            unknown = _check_unknown_keys(data)  # a typo is a typo whichever adapter is chosen
            if unknown:
                raise ValueError(" | ".join(unknown))
            unused = [k for k in ("allora_eta", "allora_coefficient") if data.get(k) is not None]
            if unused:
                LOG.warning(
                    "%s are set but `adapter` is %r, not 'allora': they are ignored.", unused, data.get("adapter")
                )
            return data
        return check_allora_config(data)


__all__ = ["ADAPTER_NAME", "COEFFICIENTS", "SUPPORTED_RL", "ALLoRAArgs", "check_allora_config"]
