"""Config args of the ALLoRA Axolotl plugin: ``allora_eta``, ``allora_coefficient``, and the ``adapter: allora`` rules.

Axolotl merges this model into its own config model (``AxolotlInputConfig``) when the plugin is listed under
``plugins:``. It imports nothing from Axolotl, so it can be validated and tested without an Axolotl install.

With ``adapter: allora`` the validator below fills the LoRA settings ALLoRA fixes (``lora_alpha = lora_r``,
``lora_dropout = 0``) and rejects settings that would silently change the ALLoRA rule, each with a message that
names the field and the fix. With any other adapter it changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from allora_trl.core.gradient import COEFFICIENTS, validate_coefficient, validate_eta

LOG = logging.getLogger(__name__)

ADAPTER_NAME = "allora"

# Fused LoRA kernels of Axolotl replace the attention / MLP forward of a LoRA layer by their own autograd
# functions, which never call peft's LoRA variant: ALLoRA's backward would be skipped without any error.
_LORA_KERNEL_FIELDS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def check_allora_config(data: dict) -> dict:
    """Return a copy of a raw Axolotl config with ALLoRA's LoRA settings filled, or raise listing every problem.

    Only acts when ``adapter == "allora"``. Fills an unset ``lora_alpha`` with ``lora_r``, an unset
    ``lora_alpha_pattern`` with ``lora_rank_pattern``, an unset ``lora_dropout`` with 0, and unset fused-kernel
    switches with false.
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
    for key in ("load_in_4bit", "load_in_8bit", "gptq"):
        if _is_set(data.get(key)):
            problems.append(
                f"`{key}` is not supported with adapter: allora: Axolotl 0.19 builds the quantised (bitsandbytes / "
                "GPTQ) model and prepares it for k-bit training only for its built-in `lora` / `qlora` adapters, "
                f"so the base model would silently load unquantised. Remove `{key}` (train a 16/32-bit base model) "
                "or use `adapter: qlora` / `lora` for quantised training."
            )
    if data.get("lora_target_parameters"):
        problems.append(
            "`lora_target_parameters` is not supported with adapter: allora (ALLoRA is implemented for LoRA on "
            "linear layers; peft wraps raw parameters such as fused MoE experts differently). Remove it and target "
            "linear modules with `lora_target_modules` / `lora_target_linear`."
        )
    for key in _LORA_KERNEL_FIELDS:
        value = data.get(key)
        if value is None:
            data[key] = False
        elif value:
            problems.append(
                f"`{key}` cannot be true with adapter: allora (Axolotl's fused LoRA kernels bypass peft's "
                f"LoRA layer forward, so the ALLoRA gradient rule would never run). Set `{key}: false` or remove it."
            )

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
        if isinstance(value, bool):  # YAML `true` would otherwise read as eta = 1.0
            raise ValueError(f"`allora_eta` must be a positive finite number (e.g. 2.0), got {value!r}.")
        return validate_eta(value, "allora_eta")

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
            unused = [k for k in ("allora_eta", "allora_coefficient") if data.get(k) is not None]
            if unused:
                LOG.warning("%s are set but `adapter` is %r, not 'allora': they are ignored.", unused, data.get("adapter"))
            return data
        return check_allora_config(data)


__all__ = ["ADAPTER_NAME", "COEFFICIENTS", "ALLoRAArgs", "check_allora_config"]
