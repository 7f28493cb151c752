"""How a command that runs the job's model and data starts: offline, with the chatty libraries' logs turned down.

Shared by ``allora-trl train`` (:mod:`allora_trl.cli`) and the checkout's benchmarks; standard library only, so the
command can call it before it knows whether the ``job`` extra is installed.
"""

from __future__ import annotations

import logging
import os

# Libraries whose INFO lines (HTTP requests, file locks, dataset caching, lm-eval's set-up) bury the job's own.
NOISY_LOGGERS = ("httpx", "urllib3", "datasets", "lm-eval", "lm_eval", "filelock")


def configure_offline_run(noisy_level: int = logging.WARNING, also_noisy: tuple[str, ...] = ()) -> None:
    """Keep the Hugging Face libraries offline (unless the environment says otherwise), turn off the tokenizers'
    fork warning, log at INFO, and raise ``NOISY_LOGGERS`` and ``also_noisy`` to ``noisy_level``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in (*NOISY_LOGGERS, *also_noisy):
        logging.getLogger(name).setLevel(noisy_level)
