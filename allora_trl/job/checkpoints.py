"""Checkpoints and faults of ``allora-trl train``: no half-written output, and one line for a full disk or Ctrl-C.

- A checkpoint whose save fails (a full disk, Ctrl-C, a non-finite model) is removed, so that resuming never picks
  it; the last complete checkpoint is kept (Transformers deletes older ones only after a save has finished).
- The final adapter is written into a staging folder inside ``output_dir`` and moved into place once whole: a failed
  save leaves no partial adapter files, nor a mix of an earlier adapter's and this one's.
- A resume checkpoint is checked against this run's model and LoRA settings before anything is evaluated or trained:
  another model's checkpoint, another ``lora_r`` or other target modules are named as such (Transformers would fail
  on an optimizer size mismatch, or load the adapter partially).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..trainers.sft import ALLoRATrainer
from .arguments import UsageError, latest_complete_checkpoint

logger = logging.getLogger("allora_trl")

TRAINER_STATE_NAME = "trainer_state.json"  # Transformers writes it last in a checkpoint
STAGING_FOLDER = ".allora-saving"  # inside output_dir: same file system, so moving out of it is a rename
# torch.save reports a full disk as a RuntimeError without errno ("PytorchStreamWriter failed writing file ...: file
# write failed"); safetensors as an error carrying the OS message.
DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "file write failed")


class DiskFullError(RuntimeError):
    """``what`` failed because the disk (or the quota) is full; ``cleaned`` says what was removed after it."""

    def __init__(self, what: str, cause: BaseException, cleaned: str = ""):
        self.what, self.cleaned = what, cleaned
        super().__init__(f"{what} failed: {' '.join(str(cause).split()) or type(cause).__name__}")


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or an exception in its chain reports a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(exc).lower() for words in DISK_FULL_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def resume_hint(output_dir: str, save_strategy: str) -> str:
    """Where to resume from: the last complete checkpoint in ``output_dir``, or that there is none yet."""
    last = latest_complete_checkpoint(output_dir)
    if last is not None:
        return (
            f"the last complete checkpoint is {last}: resume from it with the same options plus "
            "--resume_from_checkpoint."
        )
    how = " (--save_strategy steps --save_steps N writes checkpoints)" if save_strategy == "no" else ""
    return f"no checkpoint was saved yet, so there is nothing to resume from{how}."


def disk_full_message(exc: BaseException, output_dir: str, save_strategy: str) -> str:
    """One line for a run stopped by a full disk: what failed, what is kept, and how to go on."""
    ours = isinstance(exc, DiskFullError)
    what = exc.what if ours else f"writing into {output_dir}"
    cleaned = f"; {exc.cleaned}" if ours and exc.cleaned else ""
    cause = exc.__cause__ if ours and exc.__cause__ is not None else exc
    reason = " ".join(str(cause).split()) or type(cause).__name__
    hint = resume_hint(output_dir, save_strategy)
    return f"the disk is full: {what} failed ({reason}){cleaned}. Free some space; {hint}"


def close_progress_bars() -> None:
    """Close the progress bars a stopped run left open, so that the next line starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def interrupted_message(output_dir: str, save_strategy: str) -> str:
    """One line for a run stopped with Ctrl-C."""
    return f"interrupted; {resume_hint(output_dir, save_strategy)}"


class SafeCheckpointsMixin:
    """Trainer mixin: a checkpoint save that fails is removed, and a resume checkpoint must fit the model."""

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = folder / TRAINER_STATE_NAME
        had_state, started = state.is_file(), time.time_ns()
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as exc:  # Ctrl-C too: a cut-off save must not be taken for a checkpoint
            finished = state.is_file() and (not had_state or state.stat().st_mtime_ns >= started)
            if self.args.should_save and folder.is_dir() and not finished:
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning("Removed the incomplete checkpoint %s (its save was cut off).", folder)
            if isinstance(exc, Exception) and is_disk_full(exc):
                raise DiskFullError(f"writing {folder}", exc, "the partial checkpoint was removed") from exc
            raise

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resume_targets(str(resume_from_checkpoint), self.accelerator.unwrap_model(self.model))
        return super().train(resume_from_checkpoint, *args, **kwargs)


class JobTrainer(SafeCheckpointsMixin, ALLoRATrainer):
    """The command's trainer: :class:`~allora_trl.ALLoRATrainer` with :class:`SafeCheckpointsMixin`."""


def save_final_adapter(trainer, output_dir: str) -> None:
    """``trainer.save_model(output_dir)``, all or nothing: staged in ``output_dir``, then moved into place.

    The staging folder is named like ``output_dir`` (the model card takes the model's name from it) and lies inside
    it (moving out is a rename, needing no space). On failure it is removed, and a full disk becomes
    :class:`DiskFullError`.
    """
    out = Path(output_dir)
    staging_root = out / STAGING_FOLDER
    staging = staging_root / (out.resolve().name or "adapter")
    main = trainer.args.should_save
    if main and staging_root.exists():
        shutil.rmtree(staging_root)
    try:
        trainer.save_model(str(staging))
        if main:
            for item in sorted(staging.iterdir()):
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)  # a sub-adapter folder of an earlier save
                os.replace(item, target)
    except BaseException as exc:
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(f"saving the trained adapter into {out}", exc, "no part of it was left") from exc
        raise
    if main:
        shutil.rmtree(staging_root, ignore_errors=True)


LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


def _adapter_files(checkpoint: str) -> tuple[dict, dict[str, tuple[int, ...]] | None]:
    """The checkpoint's ``adapter_config.json`` and its LoRA tensor shapes (None without a safetensors file)."""
    folder = Path(checkpoint)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UsageError(
            f"resume_from_checkpoint {checkpoint!r} holds no LoRA adapter (no adapter_config.json): it is not a "
            "checkpoint of allora-trl train; pass a checkpoint-* folder of the run to continue."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return config, None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return config, {key: shape for key, shape in shapes.items() if LORA_KEY.fullmatch(key)}


def check_resume_checkpoint(checkpoint: str | None, model, lora_r: int, model_path: str) -> None:
    """Before evaluating or training: the checkpoint's adapter must fit ``model`` (the base model) and ``lora_r``.

    Raises :class:`UsageError` saying it is another model's checkpoint when a LoRA layer names a module the model
    lacks or one of another size, and naming both ranks when only ``lora_r`` differs.
    """
    if checkpoint is None:
        return
    config, shapes = _adapter_files(checkpoint)
    if shapes:
        modules = dict(model.named_modules())
        for key, shape in sorted(shapes.items()):
            match = LORA_KEY.fullmatch(key)
            module = modules.get(match["module"])
            size = getattr(module, "in_features" if match["part"] == "A" else "out_features", None)
            theirs = shape[1] if match["part"] == "A" else shape[0]
            if size != theirs:
                here = "no such layer here" if module is None else f"the layer here has {size}"
                raise UsageError(
                    f"resume_from_checkpoint {checkpoint!r} is another model's checkpoint: its adapter was trained "
                    f"on {config.get('base_model_name_or_path')!r} and does not fit this run's model {model_path!r} "
                    f"({match['module']}: {theirs} features there, {here}). Resume with that run's "
                    "--model_name_or_path, or start a new run in another --output_dir."
                )
    ranks = {config.get("r"), *(config.get("rank_pattern") or {}).values()}
    if ranks != {lora_r}:
        theirs = ", ".join(str(r) for r in sorted(r for r in ranks if r is not None))
        raise UsageError(
            f"resume_from_checkpoint {checkpoint!r} was trained with lora_r {theirs}, this run has lora_r {lora_r}: "
            f"pass --lora_r {theirs} to continue it, or start a new run in another --output_dir."
        )


def check_resume_targets(checkpoint: str, peft_model) -> None:
    """Before training resumes: the checkpoint's LoRA layers are exactly those of ``peft_model`` (same targets)."""
    from peft import get_peft_model_state_dict

    _, shapes = _adapter_files(checkpoint)
    if shapes is None:
        return
    ours = {key for key in get_peft_model_state_dict(peft_model) if LORA_KEY.fullmatch(key)}
    if set(shapes) == ours:
        return

    def names(keys):
        return ", ".join(sorted({LORA_KEY.fullmatch(key)["module"].rsplit(".", 1)[-1] for key in keys})) or "none"

    raise UsageError(
        f"resume_from_checkpoint {checkpoint!r} trained LoRA on other layers ({names(shapes)}) than this run targets "
        f"({names(ours)}): pass that run's --lora_target_modules (its adapter_config.json lists them), or start a new "
        "run in another --output_dir."
    )
