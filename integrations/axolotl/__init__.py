"""Axolotl plugin for ALLoRA (see README.md in this folder)."""
