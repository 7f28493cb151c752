"""Axolotl plugin for ALLoRA: list ``allora_trl.integrations.axolotl.ALLoRAPlugin`` under ``plugins:`` and set
``adapter: allora`` (see README.md in this folder).

``ALLoRAPlugin`` is imported lazily, on first access: the plugin module imports Axolotl, while ``args.ALLoRAArgs``
(the config model) must stay importable, and testable, without it.
"""

from .args import ALLoRAArgs

__all__ = ["ALLoRAArgs", "ALLoRACallback", "ALLoRAPlugin"]


def __getattr__(name):
    if name in ("ALLoRAPlugin", "ALLoRACallback"):
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
