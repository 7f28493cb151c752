"""The recorded benchmarks are what their committed raw runs say, and the runner still recognises those runs.

``docs/benchmarks.md`` is generated from ``benchmarks/results-full`` (one JSON per training run, the cost
measurement, the plan). A report edited by hand, or left behind by a run whose files were not committed, fails here;
so does a change to the run specs that would make ``--mode full`` or ``--mode long`` re-run finished runs instead of
resuming (the long run is committed run by run across sessions).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results-full"
LONG = ROOT / "benchmarks" / "results-long"
DOCS = ROOT / "docs" / "benchmarks.md"


def _numbers_part(text: str) -> str:
    """From the results table to the end, without the lines that record when and under what load it was made."""
    body = text[text.index("## Results") :]
    return "\n".join(line for line in body.splitlines() if "Load average" not in line and "Generated" not in line)


@pytest.mark.skipif(not (RESULTS / "plan.json").is_file(), reason="no full-mode benchmark recorded")
def test_report_rebuilt_from_the_committed_runs_matches_docs(tmp_path):
    from benchmarks.report import write_report

    out = tmp_path / "results"
    shutil.copytree(RESULTS, out)  # the rebuild rewrites plots and summary.json: leave the committed ones alone
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    shutil.copy(DOCS, docs)  # the hand-written findings block is carried over from here
    write_report(out, docs)
    committed, rebuilt = DOCS.read_text(), docs.read_text()
    assert "<!-- findings -->" in rebuilt and "## Findings" in rebuilt
    assert _numbers_part(rebuilt) == _numbers_part(committed).replace("](../benchmarks/results-full/", "](../results/")
    assert len(list((RESULTS / "runs").glob("*.json"))) >= 60  # every training run of the full mode is committed


@pytest.mark.parametrize("folder", [RESULTS, LONG], ids=["full", "long"])
def test_committed_runs_are_found_by_the_current_plan(folder):
    """Every committed run file is the run the recorded plan asks for, with an identical spec: a rerun resumes."""
    from benchmarks.analysis import load_plan, load_runs
    from benchmarks.plan import choose_lr, planned_specs
    from benchmarks.runner import load_result

    runs = load_runs(folder)
    if not (folder / "plan.json").is_file() or not runs:
        pytest.skip(f"nothing recorded in {folder.name}")
    plan = load_plan(folder)
    chosen = {m: choose_lr(plan, m, runs) for m in plan.lr_grids}
    specs = planned_specs(plan, chosen)
    assert set(runs) <= set(specs), f"runs the plan does not ask for: {sorted(set(runs) - set(specs))}"
    for run_id in runs:
        assert load_result(folder, specs[run_id]) is not None, run_id


@pytest.mark.skipif(not (LONG / "report.md").is_file(), reason="no long-mode report recorded")
def test_long_report_matches_its_runs(tmp_path):
    """The committed long-run report is what its committed runs say, and its per-task loss differences add up."""
    from benchmarks.analysis import analyse, load_plan, load_runs
    from benchmarks.report import write_report

    out = tmp_path / "results"
    shutil.copytree(LONG, out)
    docs = out / "report.md"  # beside the runs, as committed: the plots' links stay the same
    write_report(out, docs)
    assert _numbers_part(docs.read_text()) == _numbers_part((LONG / "report.md").read_text())

    plan = load_plan(LONG)
    for comparison in analyse(plan, load_runs(LONG))["comparisons"]:
        loss = comparison.get("loss")
        if not loss or len(loss["seeds"].get("seeds", [])) < 2:
            continue
        # the average loss is the mean of the task losses, so the per-task differences average to the overall one
        per_task = [loss["tasks"][t]["seeds"]["mean"] for t in plan.tasks]
        assert sum(per_task) / len(per_task) == pytest.approx(loss["seeds"]["mean"], abs=1e-9)
