"""The TRL layer: one mixin that adds ALLoRA to a TRL trainer, and the paired configs and trainers built on it."""
