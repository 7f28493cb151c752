"""``ALLoRACallback``: the one path by which every trainer (TRL's, Axolotl's) logs ALLoRA and stops on non-finite values.

Used by :class:`~allora_trl.trainers.mixin.ALLoRATrainerMixin` and by the Axolotl plugin alike, so the statistics,
the finite-number guard and the checkpoint record are the same whichever framework drives the training loop:

* Statistics: recording is switched on in the ALLoRA layers only for the optimizer steps that will be logged (the
  rule of transformers' ``DefaultFlowCallback``), so other steps pay nothing; at the end of such a step the values
  are handed to the trainer's own metric store (TRL's ``_metrics``, Axolotl's ``store_metrics``), so they reach
  every reporter and ``trainer_state.json`` in the same log line as the loss.
* Non-finite values: a logged loss, gradient norm, coefficient or reward (GRPO/RLOO's ``reward``, ``rewards/...``,
  DPO/KTO's ``rewards/chosen``...) that is NaN or infinite stops training with an error (``NonFiniteTrainingError``)
  before anything more is saved, instead of a run that ends "successfully" with a NaN adapter.
* ``allora_config.json`` is written into every checkpoint folder (when ``write_checkpoint_config``; the TRL mixin
  writes it from ``save_model`` itself).
"""

from __future__ import annotations

import inspect
import math
import os
import re

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .model import write_allora_configs
from .stats import collect_allora_stats, set_allora_stats_recording, update_is_logged

# How a metric store that reduces over the steps between two logs (Axolotl's) should reduce each statistic.
STAT_REDUCTIONS = {
    "allora/coefficient_min": "min",
    "allora/coefficient_max": "max",
    "allora/coefficient_mean": "mean",
    "allora/row_norm_mean": "mean",
}
WATCHED_LOG_KEYS = ("loss", "grad_norm", *STAT_REDUCTIONS)
# Every logged key naming a reward is watched too (a reward function returning inf, a diverged reward model). The one
# NaN that is not a divergence: TRL's GRPO/RLOO log ``rewards/<function>/mean`` (and ``/std``) as NaN when that
# function returned None for every completion of the step (TRL's way for a function to abstain).
_ABSTAINED_REWARD = re.compile(r"(eval_)?rewards/[^/]+/(mean|std)")


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or ALLoRA coefficient."""


class ALLoRACallback(TrainerCallback):
    """Record ALLoRA statistics on logged steps, stop on non-finite values, record settings in checkpoints."""

    def __init__(self, trainer, write_checkpoint_config: bool = False):
        self.trainer = trainer
        self.write_checkpoint_config = write_checkpoint_config
        self.recording = False
        self.pending: dict[str, float] = {}

    def _model(self, kwargs):
        model = getattr(self.trainer, "model", None)
        return model if model is not None else kwargs.get("model")

    def on_step_begin(self, args, state, control, **kwargs):
        model = self._model(kwargs)
        if model is not None and update_is_logged(args, state, state.global_step + 1):
            set_allora_stats_recording(model, True)
            self.recording = True

    def on_step_end(self, args, state, control, **kwargs):
        if not self.recording:
            return
        model = self._model(kwargs)
        stats = collect_allora_stats(model)
        set_allora_stats_recording(model, False)
        self.recording = False
        if stats:
            self.deliver(stats)

    def deliver(self, stats: dict[str, float]) -> None:
        """Hand the statistics to the trainer's own metric store, so they join the next log line."""
        metrics = getattr(self.trainer, "_metrics", None)
        store = getattr(self.trainer, "store_metrics", None)
        if isinstance(metrics, dict) and "train" in metrics:  # TRL: averaged and cleared by its log()
            for key, value in stats.items():
                metrics["train"][key] = [value]  # the last micro-batch of the logged update
        elif callable(store) and "reduction" in inspect.signature(store).parameters:  # Axolotl: (value, reduction)
            store({key: (value, STAT_REDUCTIONS.get(key, "mean")) for key, value in stats.items()}, train_eval="train")
        elif callable(store):  # TRL's ORPO/CPO/BCO: plain floats, averaged at log time
            store(dict(stats), train_eval="train")
        else:
            self.pending.update(stats)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self.pending and "loss" in logs:
            logs.update(self.pending)
            self.pending = {}
        bad = {key: logs[key] for key in WATCHED_LOG_KEYS if _is_non_finite(logs.get(key))}
        bad.update(
            (key, value)
            for key, value in logs.items()
            if "reward" in key
            and _is_non_finite(value)
            and not (_ABSTAINED_REWARD.fullmatch(key) and math.isnan(float(value)))
        )
        if bad:
            raise NonFiniteTrainingError(
                f"ALLoRA stopped training at step {state.global_step}: non-finite {bad}. Nothing more is saved. "
                "Lower the learning rate or allora_eta, enable gradient clipping (max_grad_norm), or check the data "
                "(and the reward functions)."
            )

    def on_save(self, args, state, control, **kwargs):
        if not self.write_checkpoint_config or not state.is_world_process_zero:
            return
        model = self._model(kwargs)
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if model is not None and os.path.isdir(folder):
            write_allora_configs(model, folder)


def _is_non_finite(value) -> bool:
    try:
        return value is not None and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
