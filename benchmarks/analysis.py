"""The analysis behind the benchmark report: what the finished runs say, with their intervals (no plots, no text).

Two sources of noise are kept apart (see ``stats.py``): seeds (training noise, a t interval over the per-seed values)
and questions or examples (which ones were drawn, a paired bootstrap). Accuracy and the held-out answer loss are
analysed the same way, over the same seeds; the loss's per-example values make its example interval much tighter.
"""

from __future__ import annotations

import statistics

from .methods import OPTIM_PAIR
from .plan import base_spec, choose_lr, optim_specs, spec_for
from .stats import example_bootstrap_mean, mean_ci, paired_diff_ci, question_bootstrap_diff

# Paired comparisons: the paper's ALLoRA (eta = 2) against each of these; every other ALLoRA variant against the first two
COMPARE_TO = ("lora", OPTIM_PAIR[1], "loraplus", "dora", "rslora", "allora_update")


def _loss_of(run) -> float | None:
    return run["answer_loss"]["mean"] if run and "answer_loss" in run else None


def _coefficient_summary(rs) -> dict | None:
    """ALLoRA's coefficient over training (mean over seeds): its lowest min, and its min / mean at the end; the row
    norms of BA at the end (mean and largest row). None for a method without the coefficient."""
    rows = [r["train"]["coefficient"] for r in rs if r["train"]["coefficient"]]
    norms = [r["train"]["row_norms"][-1] for r in rs if r["train"]["row_norms"]]
    out = {
        "ba_row_norm_mean_end": statistics.fmean(n["ba_row_norm_mean"] for n in norms) if norms else None,
        "ba_row_norm_max_end": (
            statistics.fmean(n["ba_row_norm_max"] for n in norms)
            if norms and all("ba_row_norm_max" in n for n in norms)
            else None
        ),
    }
    if not rows:
        return out
    out.update(
        {
            "min_over_training": statistics.fmean(min(c["coefficient_min"] for c in row) for row in rows),
            "min_end": statistics.fmean(row[-1]["coefficient_min"] for row in rows),
            "mean_end": statistics.fmean(row[-1]["coefficient_mean"] for row in rows),
            "mean_over_training": statistics.fmean(
                statistics.fmean(c["coefficient_mean"] for c in row) for row in rows
            ),
        }
    )
    return out


def analyse(plan, runs: dict) -> dict:
    """Selection, the reported methods (mean and intervals over seeds and over questions / examples), the paired
    comparisons, the optimizer study and the reference row, from the finished runs."""
    tasks = plan.tasks
    chosen = {m: choose_lr(plan, m, runs) for m in plan.lr_grids}
    selection = {}
    for m in plan.methods:
        grid = plan.grid(m)
        row = {}
        for lr in grid:
            run = runs.get(spec_for(plan, plan.lr_leader(m), lr, plan.select_seed, "select").run_id)
            row[lr] = None if run is None else (_loss_of(run) if plan.select_by == "loss" else run["avg_acc"])
        edge = len(grid) > 1 and chosen[m] in (grid[0], grid[-1])
        selection[m] = {"scores": row, "chosen": chosen[m], "edge": edge}

    main = {}
    for m in plan.methods:
        rs = report_runs(plan, runs, m, chosen[m])
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
        if all("answer_loss" in r for r in rs):
            per_example = {t: [r["answer_loss"]["tasks"][t]["per_example"] for r in rs] for t in tasks}
            main[m]["loss"] = {
                "avg": mean_ci([r["answer_loss"]["mean"] for r in rs]),
                "tasks": {t: mean_ci([r["answer_loss"]["tasks"][t]["nll"] for r in rs]) for t in tasks},
                "examples": example_bootstrap_mean(per_example[t] for t in tasks),
                "n_examples": {t: rs[0]["answer_loss"]["tasks"][t]["n"] for t in tasks},
                "by_seed": {r["spec"]["seed"]: r["answer_loss"]["mean"] for r in rs},
                "by_seed_task": {
                    t: {r["spec"]["seed"]: r["answer_loss"]["tasks"][t]["nll"] for r in rs} for t in tasks
                },
                "per_example": per_example,
            }
            main[m]["coefficient"] = _coefficient_summary(rs)

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
        out = {"a": a, "b": b, "seeds": seeds, "questions": questions}
        if "loss" in main[a] and "loss" in main[b]:
            loss_seeds = paired_diff_ci(main[a]["loss"]["by_seed"], main[b]["loss"]["by_seed"])
            pairs = {  # per task: each common seed's per-example losses of a and of b
                t: (
                    [main[a]["loss"]["per_example"][t][i] for i in idx_a],
                    [main[b]["loss"]["per_example"][t][i] for i in idx_b],
                )
                for t in tasks
            }
            examples = question_bootstrap_diff(list(pairs.values()))
            out["loss"] = {"seeds": loss_seeds, "examples": examples}
            # per task as well: one task can carry (or hide) the whole average difference
            out["loss"]["tasks"] = {}
            for t in tasks:
                task_seeds = paired_diff_ci(main[a]["loss"]["by_seed_task"][t], main[b]["loss"]["by_seed_task"][t])
                task_examples = question_bootstrap_diff([pairs[t]])
                out["loss"]["tasks"][t] = {"seeds": task_seeds, "examples": task_examples}
        return out

    comparisons = []
    for a in [m for m in plan.methods if m.startswith("allora")]:
        for b in COMPARE_TO:
            if a != b and a in main and b in main and (a == OPTIM_PAIR[0] or b in ("lora", OPTIM_PAIR[1])):
                comparisons.append(compare(a, b))

    optim = {}
    for regime, spec in optim_specs(plan, chosen):
        run = runs.get(spec.run_id)
        if run is None:
            continue
        entry = optim.setdefault(
            regime,
            {"optim": spec.optim, "lr": spec.lr, "clip": spec.max_grad_norm, "lrs": {}, "runs": {}, "run_ids": {}},
        )
        entry["lrs"][spec.method] = spec.lr
        entry["runs"].setdefault(spec.method, []).append(run)
        entry["run_ids"].setdefault(spec.method, []).append(spec.run_id)
    for entry in optim.values():
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
                "coef_min_all": min(
                    (c["coefficient_min"] for r in rs for c in r["train"]["coefficient"]), default=None
                ),
                "clipped": statistics.fmean(r["train"]["clipped_fraction"] for r in rs),
                "diverged": sum(bool(r["train"]["diverged"]) for r in rs),
                "correct": {t: [r["eval"][t]["correct"] for r in rs] for t in tasks},
            }
        a, b = per.get(OPTIM_PAIR[0]), per.get(OPTIM_PAIR[1])
        if a and b:
            seeds = paired_diff_ci(a["by_seed"], b["by_seed"])
            questions = question_bootstrap_diff([(a["correct"][t], b["correct"][t]) for t in tasks])
            loss = paired_diff_ci(
                {
                    s: r["train"]["final_loss"]
                    for s, r in ((r["spec"]["seed"], r) for r in entry["runs"][OPTIM_PAIR[0]])
                },
                {
                    s: r["train"]["final_loss"]
                    for s, r in ((r["spec"]["seed"], r) for r in entry["runs"][OPTIM_PAIR[1]])
                },
            )
            entry["diff"] = {"seeds": seeds, "questions": questions, "loss": loss}
        entry["per_method"] = per
        del entry["runs"]

    base = runs.get(base_spec(plan).run_id)
    reference = None if base is None else {"avg": base["avg_acc"], "tasks": {t: base["eval"][t]["acc"] for t in tasks}}
    if base is not None and "answer_loss" in base:
        reference["loss"] = {
            "avg": base["answer_loss"]["mean"],
            "tasks": {t: base["answer_loss"]["tasks"][t]["nll"] for t in tasks},
        }
    return {
        "chosen": chosen,
        "selection": selection,
        "main": main,
        "comparisons": [c for c in comparisons if c],
        "optim": optim,
        "base": reference,
        "has_loss": any("loss" in v for v in main.values()),
    }


def report_runs(plan, runs: dict, method: str, lr: float, optim: str = "adamw") -> list[dict]:
    """The finished reported runs of ``method`` at ``lr``, in seed order."""
    got = [runs.get(spec_for(plan, method, lr, s, "report", optim).run_id) for s in plan.seeds]
    return [r for r in got if r is not None]
