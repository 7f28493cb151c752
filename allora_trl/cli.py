"""The ``allora-trl`` command: dispatches to the job in :mod:`allora_trl.job` (as ``trl`` dispatches to its scripts).

``allora-trl train [--config FILE.yaml] [--key value ...]`` with no arguments fine-tunes SmolLM2-135M-Instruct on
ARC-Easy offline (see :mod:`allora_trl.job.train`). The job needs the ``job`` extra; without it the command says
which extra to install instead of failing with an import error.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# The job's own needs beyond the library (the `job` extra in pyproject.toml): module name -> pip requirement.
JOB_MODULES = {"gguf": "gguf", "lm_eval": "lm-eval", "matplotlib": "matplotlib", "yaml": "pyyaml"}

USAGE = """usage: allora-trl train [--config FILE.yaml] [--key value ...]

train: fine-tune with ALLoRA (arXiv 2410.09692). With no options: SmolLM2-135M-Instruct on ARC-Easy, offline, a few
minutes on a CPU. `allora-trl train --help` lists every option (ALLoRAConfig = TRL's SFTConfig + allora_eta,
allora_coefficient, allora_scale).
The benchmarks run from a source checkout: `python -m benchmarks.compare --help` (docs/benchmarks.md).
"""


def missing_job_modules() -> list[str]:
    """The pip requirements of the ``job`` extra that are not installed."""
    return [req for module, req in JOB_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (Ctrl-C before training: 130, nothing written)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("allora-trl train: interrupted before training started; nothing was written.", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "train":
        print(f"allora-trl: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    missing = missing_job_modules()
    if missing:
        print(
            f"allora-trl train: error: the job needs the `job` extra ({', '.join(missing)} missing). Install it with "
            '`pip install "allora-trl[job]"` (or `pip install -e ".[job]"` in a checkout).',
            file=sys.stderr,
        )
        return 2
    from .job.startup import configure_offline_run

    configure_offline_run()

    from .job.arguments import UsageError, build_parser, check_config_file, validate

    try:
        check_config_file(rest)
        # argparse's own errors (unknown option, bad type) print the short usage and exit 2 from inside parse
        script_args, training_args, unknown = build_parser().parse_args_and_config(
            args=rest, return_remaining_strings=True
        )
        if unknown:
            raise UsageError(
                f"unknown option(s) {' '.join(unknown)} (on the command line or as --config keys); "
                "`allora-trl train --help` lists every option."
            )
        validate(script_args, training_args)
    except ValueError as exc:  # UsageError, ALLoRAConfig's checks, unknown YAML keys: one line, no traceback
        return usage_error(exc)

    from .core.callback import NonFiniteTrainingError
    from .job.checkpoints import close_progress_bars, disk_full_message, interrupted_message, is_disk_full
    from .job.train import run_training

    output_dir, save_strategy = training_args.output_dir, training_args.save_strategy
    existed = os.path.exists(output_dir)
    try:
        run_training(script_args, training_args)
    except UsageError as exc:  # the checks that need the data or the model, still before anything is written
        remove_if_new_and_empty(output_dir, existed)
        return usage_error(exc)
    except NonFiniteTrainingError as exc:  # a diverged run: its message says what to change; no traceback needed
        print(f"allora-trl train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: where to resume from, as the shell's convention for SIGINT says
        remove_if_new_and_empty(output_dir, existed)
        close_progress_bars()
        print(f"allora-trl train: {interrupted_message(output_dir, save_strategy)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        remove_if_new_and_empty(output_dir, existed)
        close_progress_bars()
        print(f"allora-trl train: error: {disk_full_message(exc, output_dir, save_strategy)}", file=sys.stderr)
        return 1
    return 0


def remove_if_new_and_empty(folder: str, existed: bool) -> None:
    """Remove ``folder`` if this run created it and left it empty (Transformers creates ``output_dir`` early)."""
    if not existed:
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or already gone
            pass


def usage_error(exc: Exception) -> int:
    """Print ``exc`` as one line after the command's name; the exit status of a usage error."""
    print(f"allora-trl train: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
