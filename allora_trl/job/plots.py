"""PNG plots from a Trainer's ``log_history`` (matplotlib, headless)."""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike, title: str = "Training loss") -> str:
    """Training loss against step (and, when logged, the mean ALLoRA coefficient on a second axis)."""
    plt = _pyplot()
    rows = [r for r in log_history if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    coef = [r for r in log_history if "allora/coefficient_mean" in r]
    if coef:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in coef],
            [r["allora/coefficient_mean"] for r in coef],
            color="tab:orange",
            linestyle="--",
            label="mean coefficient",
        )
        ax2.set_ylabel("mean ALLoRA coefficient", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
