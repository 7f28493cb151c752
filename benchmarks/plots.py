"""The benchmark report's plots (PNG, matplotlib without a display), drawn from the runs and their analysis."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: benchmark machines have no display
import matplotlib.pyplot as plt  # noqa: E402

from .analysis import report_runs as analysis_report_runs  # noqa: E402
from .methods import METHODS, OPTIM_PAIR, get_method  # noqa: E402


def _mean_curve(rows_list, x_key, y_key):
    """Mean over runs of y at each x present in all runs."""
    curves = [{r[x_key]: r[y_key] for r in rows if y_key in r} for rows in rows_list]
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return xs, [statistics.fmean(c[x] for c in curves) for x in xs]


def _smooth(ys, window=5):
    out = []
    for i in range(len(ys)):
        part = [y for y in ys[max(0, i - window + 1) : i + 1] if math.isfinite(y)]
        out.append(statistics.fmean(part) if part else float("nan"))
    return out


def _method_panels(plan, methods, stats_of, base_of, ylabel, path: Path, bounds=(None, None)) -> str:
    """One panel per task and one for the average: each method's mean with its seed interval; the base model dotted."""
    panels = ["average", *plan.tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        stats = [stats_of(m, panel) for m in methods]
        means = [s["mean"] for s in stats]
        errs = [s["half"] if math.isfinite(s["half"]) else 0 for s in stats]
        for i, (m, mean, err) in enumerate(zip(methods, means, errs)):
            color = "tab:orange" if m.startswith("allora") and m != OPTIM_PAIR[1] else "tab:blue"
            ax.errorbar([i], [mean], yerr=[err], fmt="o", color=color, capsize=4)
        if base_of:
            ax.axhline(base_of(panel), color="gray", linestyle=":", label="before fine-tuning")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        lo = min(m - e for m, e in zip(means, errs)) if means else 0
        hi = max(m + e for m, e in zip(means, errs)) if means else 1
        pad = max(0.02, (hi - lo) * 0.3)
        low, high = lo - pad, hi + pad
        ax.set_ylim(
            low if bounds[0] is None else max(bounds[0], low), high if bounds[1] is None else min(bounds[1], high)
        )
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel(ylabel)
    if base_of:
        axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def make_plots(plan, runs, analysis, cost, plot_dir: Path) -> dict[str, str]:
    """The report's PNGs in ``plot_dir``; returns their paths by name (accuracy, loss, row_norm, coefficient,
    lr_selection when a grid was searched, cost when it was measured)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    main = analysis["main"]
    methods = [m for m in plan.methods if m in main]

    # 1. accuracy with 95% CI (seeds); 1b. the held-out answer loss the same way
    base = analysis["base"] or {}
    paths["accuracy"] = _method_panels(
        plan,
        methods,
        lambda m, panel: main[m]["avg"] if panel == "average" else main[m]["tasks"][panel],
        (lambda panel: base["avg"] if panel == "average" else base["tasks"][panel]) if base else None,
        f"accuracy (mean of {len(plan.seeds)} seeds, 95% t-CI)",
        plot_dir / "accuracy.png",
        bounds=(0, 1),
    )
    with_loss = [m for m in methods if "loss" in main[m]]
    if with_loss:
        base_loss = base.get("loss")
        paths["answer_loss"] = _method_panels(
            plan,
            with_loss,
            lambda m, panel: main[m]["loss"]["avg"] if panel == "average" else main[m]["loss"]["tasks"][panel],
            (lambda panel: base_loss["avg"] if panel == "average" else base_loss["tasks"][panel])
            if base_loss
            else None,
            "held-out answer loss (nats, 95% t-CI)",
            plot_dir / "answer_loss.png",
        )

    def report_runs(method, lr):
        return analysis_report_runs(plan, runs, method, lr)

    # 2. loss curves (mean over seeds, moving average of 5 steps)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        rs = report_runs(m, main[m]["lr"])
        xs, ys = _mean_curve(
            [[{"step": s, "loss": x} for s, x in zip(r["train"]["loss_steps"], r["train"]["loss"])] for r in rs],
            "step",
            "loss",
        )
        ax.plot(xs, _smooth(ys), label=f"{m} (lr {main[m]['lr']:g})", linestyle="-" if m.startswith("allora") else "--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over seeds, 5-step moving average)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths["loss"] = str(plot_dir / "loss.png")
    fig.savefig(paths["loss"], dpi=110)
    plt.close(fig)

    # 3. escape from zero: mean row norm of the adapter's weight change over the first steps
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    picks = [m for m in METHODS if m in main and m not in ("allora_output", "rslora")]
    for key, ax, title in (
        ("delta_row_norm_mean", axes[0], "row norm of the weight change scaling*BA"),
        ("ba_row_norm_mean", axes[1], "row norm of BA"),
    ):
        for m in picks:
            xs, ys = _mean_curve([r["train"]["row_norms"] for r in report_runs(m, main[m]["lr"])], "step", key)
            xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ([], [])
            ax.plot(
                xs,
                ys,
                marker=".",
                label=f"{m} (lr {main[m]['lr']:g})",
                linestyle="-" if m.startswith("allora") and m != OPTIM_PAIR[1] else "--",
            )
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("mean over rows and layers (mean of seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Escape from zero: B starts at 0 (LoRA vs ALLoRA)", fontsize=10)
    fig.tight_layout()
    paths["row_norm"] = str(plot_dir / "row_norm.png")
    fig.savefig(paths["row_norm"], dpi=110)
    plt.close(fig)

    # 4. coefficient min / mean over steps: the main ALLoRA runs and the optimiser-study regimes
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    series = [(m, report_runs(m, main[m]["lr"]), m) for m in methods if m.startswith("allora") and m != OPTIM_PAIR[1]]
    for regime, entry in analysis["optim"].items():
        if regime != "adamw":
            rs = [runs[i] for i in entry["run_ids"].get(OPTIM_PAIR[0], []) if i in runs]
            series.append((OPTIM_PAIR[0], rs, f"{OPTIM_PAIR[0]} [{regime}, lr {entry['lr']:g}]"))
    for i, (_, rs, label) in enumerate(series):
        rows = [r["train"]["coefficient"] for r in rs if r["train"]["coefficient"]]
        if not rows:
            continue
        color = f"C{i % 10}"
        xs, mins = _mean_curve(rows, "step", "coefficient_min")
        _, means = _mean_curve(rows, "step", "coefficient_mean")
        ax.plot(xs, means, color=color, label=f"{label}: mean")
        ax.plot(xs, mins, color=color, linestyle=":", label=f"{label}: min")
    for eta in sorted({get_method(m).eta for m, *_ in series}):
        ax.axhline(eta, color="gray", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ALLoRA coefficient c (eta at B = 0; grey lines: eta)")
    ax.set_title("How far the coefficient moves from eta", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths["coefficient"] = str(plot_dir / "coefficient.png")
    fig.savefig(paths["coefficient"], dpi=110)
    plt.close(fig)

    # 5. LR selection curves
    if any(len(plan.grid(m)) > 1 for m in plan.methods):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for m in plan.methods:
            scores = analysis["selection"][m]["scores"]
            xs = [lr for lr, v in scores.items() if v is not None]
            if len(xs) > 1:
                ax.plot(
                    xs,
                    [scores[lr] for lr in xs],
                    marker="o",
                    label=m,
                    linestyle="-" if m.startswith("allora") else "--",
                )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(
            "selection held-out answer loss (nats, mean over tasks, 1 seed)"
            if plan.select_by == "loss"
            else "selection accuracy (mean over tasks, 1 seed)"
        )
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths["lr_selection"] = str(plot_dir / "lr_selection.png")
        fig.savefig(paths["lr_selection"], dpi=110)
        plt.close(fig)

    # 6. cost
    if cost:
        names = list(cost["methods"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].boxplot(
            [
                [t / r for t, r in zip(cost["methods"][n]["times_s"], cost["methods"][cost["reference"]]["times_s"])]
                for n in names
            ],
            tick_labels=names,
        )
        axes[0].axhline(1.02, color="red", linestyle=":", label="+2% target")
        axes[0].axhline(1.0, color="gray", linewidth=0.5)
        axes[0].set_ylabel(f"step time / {cost['reference']} (same round)")
        axes[0].legend(fontsize=7)
        axes[1].bar(
            names,
            [cost["methods"][n]["total_memory_ratio"] for n in names],
            color="tab:blue",
            alpha=0.8,
            label="total (model + adapter + Adam state + step peak)",
        )
        axes[1].bar(
            names,
            [cost["methods"][n]["step_peak_ratio"] for n in names],
            color="none",
            edgecolor="black",
            label="step peak only",
        )
        axes[1].axhline(1.01, color="red", linestyle=":", label="+1% target")
        axes[1].set_ylim(0.9, max(1.1, max(cost["methods"][n]["step_peak_ratio"] for n in names) * 1.05))
        axes[1].set_ylabel(f"memory / {cost['reference']}")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
        fig.tight_layout()
        paths["cost"] = str(plot_dir / "cost.png")
        fig.savefig(paths["cost"], dpi=110)
        plt.close(fig)
    return paths
