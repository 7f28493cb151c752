"""Axolotl plugin for ALLoRA: list ``allora_trl.integrations.axolotl.ALLoRAPlugin`` under ``plugins:`` and set
``adapter: allora`` (see README.md in this folder).

``ALLoRAPlugin`` is imported lazily, on first access: the plugin module imports Axolotl, while ``args.ALLoRAArgs``
(the config model) must stay importable, and testable, without it. Statistics and checkpoint records come from the
shared ``allora_trl.core.callback.ALLoRACallback``, as for the TRL trainers.
"""

from .args import ALLoRAArgs

__all__ = ["ALLoRAArgs", "ALLoRAPlugin"]


def __getattr__(name):
    if name == "ALLoRAPlugin":
        from . import plugin

        return plugin.ALLoRAPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
