"""Start a multi-process job with a standard launcher (``torchrun`` or ``accelerate launch``) and check it ended well.

Only process start-up lives here: rendezvous, ranks and sharding are the launcher's and torch's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 110  # each test must stay well under 2 minutes on 2 shared CPU cores


def worker_env() -> dict[str, str]:
    """Offline, one thread per process (2 shared cores), and this folder importable by the workers."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_checked(cmd: list[str], cwd: Path | None = None, timeout_s: int = TIMEOUT_S) -> str:
    """Run ``cmd``; on failure raise with the tail of its output (the ranks' tracebacks are there)."""
    proc = subprocess.run(
        cmd, cwd=cwd or HERE, env=worker_env(), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}")
    return output


def torchrun(script: str, *args: str, nproc: int = 2, timeout_s: int = TIMEOUT_S) -> str:
    """``torchrun --standalone`` (a free local port: parallel test runs do not collide)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return run_checked(cmd + [str(HERE / script), *args], timeout_s=timeout_s)


def accelerate_launch(*args: str) -> str:
    """``accelerate launch ARGS`` (the same entry point as the ``accelerate`` command)."""
    return run_checked([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *args])
