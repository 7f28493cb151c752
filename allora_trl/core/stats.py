"""ALLoRA statistics for logging: coefficient min / mean / max and the mean row norm of BA.

Each layer records its statistics in its forward pass only while recording is switched on (see
:class:`~allora_trl.core.gradient.CoefficientStats`); values stay on the device until :func:`collect_allora_stats`
stacks them there and copies them to the host in one transfer, so steps that are not logged pay nothing and
synchronise nothing, and a logged step synchronises once however many layers the model has.
"""

from __future__ import annotations

import torch

from .model import allora_variants


def update_is_logged(args, state, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) will be logged: the rule of transformers' ``DefaultFlowCallback``."""
    if step == 1 and args.logging_first_step:
        return True
    logging_steps = state.logging_steps or args.logging_steps
    return args.logging_strategy == "steps" and bool(logging_steps) and step % logging_steps == 0


def set_allora_stats_recording(model: torch.nn.Module, enabled: bool) -> None:
    """Switch recording of coefficient statistics on or off in every ALLoRA layer of ``model``."""
    for variant in allora_variants(model):
        variant.stats.enabled = enabled
        if enabled:
            variant.stats.values = {}


def collect_allora_stats(model: torch.nn.Module, prefix: str = "allora/") -> dict[str, float]:
    """Aggregate the statistics every ALLoRA layer recorded in its last recorded forward pass (the coefficient the
    following backward applies).

    Returns ``{prefix + "coefficient_min"|"coefficient_mean"|"coefficient_max"|"row_norm_mean": float}`` over all
    rows (for ``coefficient="output"``, all tokens and rows) of all layers, or ``{}`` if nothing was recorded.
    """
    recorded = [v.stats.values for v in allora_variants(model) if v.stats.values]
    if not recorded:
        return {}
    keys = (
        "coefficient_min",
        "coefficient_max",
        "coefficient_sum",
        "coefficient_count",
        "row_norm_sum",
        "row_norm_count",
    )
    device = recorded[0][keys[0]].device  # layers on other devices are copied device-to-device, without a host sync
    table = torch.stack([values[k].float().to(device) for values in recorded for k in keys]).cpu()  # the one transfer
    c_min, c_max, c_sum, c_count, n_sum, n_count = table.view(len(recorded), len(keys)).T
    return {
        f"{prefix}coefficient_min": c_min.min().item(),
        f"{prefix}coefficient_mean": (c_sum.sum() / c_count.sum()).item(),
        f"{prefix}coefficient_max": c_max.max().item(),
        f"{prefix}row_norm_mean": (n_sum.sum() / n_count.sum()).item(),
    }
