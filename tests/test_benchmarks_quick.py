"""``python -m benchmarks.run --mode quick``: the whole benchmark pipeline on the real model, a few minutes.

Checks that the outputs are well-formed (run JSONs, the Markdown table, the plots), not what the numbers are. Also
fast checks of the pieces that do not need the model (plans, statistics, splits).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_statistics_small_samples():
    from benchmarks.stats import inside_noise, mean_ci, paired_diff_ci, question_bootstrap_diff, t_quantile

    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    ci = mean_ci([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_ci([0.5])["half"])
    diff = paired_diff_ci({1: 0.7, 2: 0.8, 3: 0.75}, {1: 0.6, 2: 0.7, 3: 0.66})
    assert diff["seeds"] == [1, 2, 3] and diff["low"] > 0 and not inside_noise(diff)
    boot = question_bootstrap_diff([([[1, 1, 0, 1]], [[0, 1, 0, 1]])], n_boot=200)
    assert boot["mean"] == pytest.approx(0.25) and boot["low"] <= boot["mean"] <= boot["high"]
    assert inside_noise({"low": -0.1, "high": 0.2})


def test_reported_questions_never_select():
    from benchmarks.data import eval_pool, split_plan

    for task in ("piqa", "winogrande", "arc_easy"):
        select = {json.dumps(d, sort_keys=True) for d in eval_pool(task, "select")}
        report = {json.dumps(d, sort_keys=True) for d in eval_pool(task, "report")}
        assert select and report and not select & report
    assert split_plan("arc_easy") == {"select": "validation", "report": "test"}


def test_plans_and_grids():
    from benchmarks.plan import centred_grid
    from benchmarks.run import main

    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 3) == [1e-4, 2e-4, 4e-4]
    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 1) == [2e-4]
    assert main(["--mode", "full", "--dry-run", "--out", os.devnull + "-unused"]) == 0
    with pytest.raises(SystemExit):
        main(["--mode", "quick", "--methods", "nope", "--dry-run"])


def test_shared_learning_rates_take_the_leaders_choice():
    from benchmarks.plan import choose_lr, make_plan, selection_specs, spec_for

    plan = make_plan("full", select_by="acc")
    assert plan.lr_shared["allora0"] == "allora_eta2_4"
    selected = {spec.method for spec in selection_specs(plan)}
    assert "allora_eta2_4" in selected and not selected & set(plan.lr_shared)
    lr = plan.grid("allora_eta2_4")[-1]
    results = {spec_for(plan, "allora_eta2_4", x, plan.select_seed, "select").run_id: {"avg_acc": 0.5 + (x == lr)}
               for x in plan.grid("allora_eta2_4")}
    assert choose_lr(plan, "allora0", results) == choose_lr(plan, "allora_eta2_4", results) == lr
    # without its leader a method selects its own LR
    alone = make_plan("full", methods=["allora0", "lora"])
    assert alone.lr_shared == {} and "allora0" in {spec.method for spec in selection_specs(alone)}


def test_rebuilt_report_keeps_the_findings(tmp_path):
    from benchmarks.report import keep_findings

    docs = tmp_path / "benchmarks.md"
    new = "# Benchmarks\n\n## How this was produced\n\nnew numbers\n"
    assert keep_findings(new, docs) == new  # no old report
    docs.write_text("# old\n\n<!-- findings -->\nALLoRA = ALLoRA-0 under AdamW.\n<!-- /findings -->\n\nold numbers\n")
    kept = keep_findings(new, docs)
    assert "ALLoRA = ALLoRA-0 under AdamW." in kept and "new numbers" in kept and "old numbers" not in kept
    assert kept.index("<!-- findings -->") < kept.index("## How this was produced")


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    out, docs = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--mode", "quick", "--out", str(out), "--docs", str(docs)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = sorted((out / "runs").glob("*.json"))
    names = {p.stem for p in runs}
    assert "report__base" in names
    assert "report__lora__adamw__lr0.0002__s1__n5" in names
    assert "report__allora_eta2_4__adamw__lr0.0002__s1__n5" in names
    assert any("__sgd__" in n and n.startswith("report__allora0") for n in names)
    for path in runs:
        data = json.loads(path.read_text())
        assert {"run_id", "spec", "eval", "avg_acc", "wall_s", "versions"} <= set(data)
        assert data["eval"]["arc_easy"]["n"] == 16 and len(data["eval"]["arc_easy"]["correct"]) == 16
        assert 0.0 <= data["avg_acc"] <= 1.0
        if "train" in data:
            train = data["train"]
            assert {"loss", "row_norms", "coefficient", "grad_norm", "step_time_median_s", "diverged"} <= set(train)
            assert len(train["loss"]) == 5 and len(train["row_norms"]) == 6
            assert bool(train["coefficient"]) == data["spec"]["method"].startswith("allora_eta")

    text = docs.read_text()
    assert "python -m benchmarks.run --mode quick" in text and "Quick mode" in text
    assert "| `lora` | 0.0002 |" in text and "| `allora_eta2_4` | 0.0002 |" in text
    assert "| before fine-tuning |" in text
    assert "Cost: step time and memory" in text and "`allora`: ALLoRA" in text
    assert "AdamW vs SGD" in text
    for png in ("accuracy", "loss", "row_norm", "coefficient", "cost"):
        path = out / "plots" / f"{png}.png"
        assert path.is_file() and path.stat().st_size > 1000
        assert f"({os.path.relpath(path, docs.parent)})" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cores"] >= 1 and summary["versions"]["torch"]
    assert (out / "cost.json").is_file() and (out / "plan.json").is_file()

    # Resume: the same command again skips every finished run.
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--mode", "quick", "--out", str(out), "--docs", str(docs),
         "--no-cost"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skip (finished)") == len(runs)
