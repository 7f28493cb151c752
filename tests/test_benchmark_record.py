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
