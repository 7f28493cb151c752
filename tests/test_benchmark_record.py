"""The committed benchmark record: its reports are what its runs say, the numbers people quote are the runs' numbers,
and a benchmark command can add the runs it is missing but never change it.

The record is ``benchmarks/results-full`` and ``benchmarks/results-long``: one JSON per run, the plan, the cost
measurement, and the generated ``report.md``. The findings are written by people in docs/benchmarks.md; the test here
checks the numbers they cite, not their wording.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT / "benchmarks" / "results-full"
LONG = ROOT / "benchmarks" / "results-long"
DOCS = ROOT / "docs" / "benchmarks.md"
RECORDED = pytest.mark.skipif(
    not ((FULL / "plan.json").is_file() and (LONG / "plan.json").is_file()), reason="no benchmark recorded"
)


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@RECORDED
@pytest.mark.parametrize("folder", [FULL, LONG], ids=["full", "long"])
def test_committed_report_is_what_the_runs_say(tmp_path, folder):
    """Every table row of the committed report is rebuilt from the committed runs; the report reads nothing for you."""
    from benchmarks.report import write_report

    out = tmp_path / folder.name
    shutil.copytree(folder, out)  # the rebuild rewrites report.md, plots and summary.json: leave the record alone
    write_report(out)
    rebuilt, committed = (out / "report.md").read_text(), (folder / "report.md").read_text()
    assert _table_rows(rebuilt) == _table_rows(committed)
    assert len(_table_rows(committed)) > 20
    verdicts = re.findall(r"\b(better|worse|inside the noise|Recommendation|met|missed|Answer)\b", rebuilt)
    assert not verdicts, f"the generated report reads the numbers for the reader: {verdicts}"


@RECORDED
@pytest.mark.parametrize("folder", [FULL, LONG], ids=["full", "long"])
def test_committed_runs_are_the_runs_their_plan_asks_for(folder):
    """Every committed run file, read under today's names, is a run of the recorded plan (a rerun resumes), and every
    run of the plan is committed."""
    from benchmarks.plan import choose_lr, planned_specs
    from benchmarks.record import load_plan, load_runs

    runs, plan = load_runs(folder), load_plan(folder)
    specs = planned_specs(plan, {m: choose_lr(plan, m, runs) for m in plan.lr_grids})
    assert set(runs) == set(specs)
    assert len(runs) == len(list((folder / "runs").glob("*.json")))  # no two files read as one run


@RECORDED
def test_long_preset_is_the_recorded_long_plan():
    from benchmarks.plan import make_plan
    from benchmarks.record import load_plan, merge_plans

    assert merge_plans(load_plan(LONG), make_plan("long")) == load_plan(LONG)


@RECORDED
def test_a_command_with_another_plan_stops_before_touching_the_record(tmp_path, capsys):
    """Today's `--mode full` is not the recorded full run (its LRs were chosen by accuracy, no held-out loss): pointed
    at a copy of the record it says so in one line, exits 2 and writes nothing."""
    from benchmarks.compare import main

    out = tmp_path / "results-full"
    shutil.copytree(FULL, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["--mode", "full", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "select_by" in message and "loss_limit" in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@RECORDED
def test_long_report_loss_differences_add_up():
    """The average loss is the mean of the task losses, so the per-task differences average to the overall one."""
    analysis = _analysis(LONG)
    tasks = ("arc_easy", "boolq", "piqa")
    for comparison in analysis["comparisons"]:
        loss = comparison["loss"]
        per_task = [loss["tasks"][t]["seeds"]["mean"] for t in tasks]
        assert sum(per_task) / len(per_task) == pytest.approx(loss["seeds"]["mean"], abs=1e-9)


# ----- the numbers docs/benchmarks.md cites ------------------------------------------------------------------------


@functools.cache
def _analysis(folder: Path) -> dict:
    from benchmarks.analysis import analyse
    from benchmarks.record import load_plan, load_runs

    return analyse(load_plan(folder), load_runs(folder))


def _comparison(analysis, a, b) -> dict:
    return next(c for c in analysis["comparisons"] if (c["a"], c["b"]) == (a, b))


def _iv(ci, digits, scale=1.0) -> str:
    return f"[{scale * ci['low']:+.{digits}f}, {scale * ci['high']:+.{digits}f}]"


def _full_citations() -> dict[str, str]:
    """The numbers the full run's findings quote, computed from the runs: what -> the number as the docs print it."""
    a = _analysis(FULL)
    vs = functools.partial(_comparison, a, "allora")
    diff = {r: e["diff"] for r, e in a["optim"].items()}
    ours = {r: e["per_method"]["allora"] for r, e in a["optim"].items()}
    theirs = {r: e["per_method"]["allora0"] for r, e in a["optim"].items()}
    final = [a["main"][m]["final_loss"]["mean"] for m in a["main"] if m.startswith("allora")]
    cost = json.loads((FULL / "cost.json").read_text())["methods"]  # names as recorded: `allora` is today's too
    layer = next(
        b["extra_info"]
        for b in json.loads((FULL / "layer_speed.json").read_text())["benchmarks"]
        if b["name"].startswith("test_ratio_summary")
    )
    return {
        "ALLoRA - LoRA, accuracy points": f"{100 * vs('lora')['seeds']['mean']:+.1f}",
        "ALLoRA - LoRA, interval over seeds": _iv(vs("lora")["seeds"], 1, 100),
        "ALLoRA - LoRA, interval over questions": _iv(vs("lora")["questions"], 1, 100),
        "ALLoRA - LoRA+": f"{100 * vs('loraplus')['seeds']['mean']:+.1f}",
        "ALLoRA - LoRA+, interval over seeds": _iv(vs("loraplus")["seeds"], 1, 100),
        "ALLoRA - DoRA": f"{100 * vs('dora')['seeds']['mean']:+.1f}",
        "ALLoRA - rsLoRA": f"{100 * vs('rslora')['seeds']['mean']:+.1f}",
        "final losses of ALLoRA-0 and the ALLoRA variants": f"{min(final):.3f}-{max(final):.3f}",
        "AdamW: coefficient min at the end": f"{ours['adamw']['coef_min_end']:.3f}",
        "AdamW: coefficient mean at the end": f"{ours['adamw']['coef_mean_end']:.3f}",
        "AdamW: ALLoRA-0's clipped steps": f"{100 * theirs['adamw']['clipped']:.0f}%",
        "4x AdamW: coefficient's lowest min": f"{ours['adamw_high']['coef_min_all']:.2f}",
        "4x AdamW: coefficient mean at the end": f"{ours['adamw_high']['coef_mean_end']:.2f}",
        "4x AdamW: accuracy difference": f"{100 * diff['adamw_high']['seeds']['mean']:+.1f}",
        "4x AdamW: ALLoRA's final loss": f"{ours['adamw_high']['final_loss']['mean']:.3f}",
        "4x AdamW: ALLoRA-0's final loss": f"{theirs['adamw_high']['final_loss']['mean']:.3f}",
        "SGD: ALLoRA's row norm": f"{ours['sgd']['delta_row_norm_end']:.5f}",
        "SGD: ALLoRA-0's row norm": f"{theirs['sgd']['delta_row_norm_end']:.5f}",
        "SGD: coefficient min at the end": f"{ours['sgd']['coef_min_end']:.2f}",
        "SGD: accuracy difference": f"{100 * diff['sgd']['seeds']['mean']:+.1f}",
        "SGD: accuracy interval over seeds": _iv(diff["sgd"]["seeds"], 1, 100),
        "SGD: ALLoRA's final loss": f"{ours['sgd']['final_loss']['mean']:.3f}",
        "SGD: ALLoRA-0's final loss": f"{theirs['sgd']['final_loss']['mean']:.3f}",
        "SGD: final-loss interval": _iv(diff["sgd"]["loss"], 2),
        "allora_update / ALLoRA-0 wall time": f"{cost['allora_update']['time_ratio']['median']:.3f}",
        "allora_update / ALLoRA-0 CPU time": f"{cost['allora_update']['cpu_time_ratio']['median']:.3f}",
        "ALLoRA / ALLoRA-0 wall time": f"{cost['allora']['time_ratio']['median']:.3f}",
        "ALLoRA / ALLoRA-0 CPU time": f"{cost['allora']['cpu_time_ratio']['median']:.3f}",
        "one layer, ALLoRA / LoRA": f"{layer['allora_over_lora_median']:.3f} [{layer['q1']:.3f}, {layer['q3']:.3f}]",
        "LoRA / ALLoRA-0 time": f"{cost['lora']['time_ratio']['median']:.2f}x",
        "LoRA / ALLoRA-0 step peak": f"{cost['lora']['step_peak_ratio']:.2f}x",
        "DoRA / ALLoRA-0 time": f"{cost['dora']['time_ratio']['median']:.2f}x",
        "DoRA / ALLoRA-0 step peak": f"{cost['dora']['step_peak_ratio']:.2f}x",
        "output ablation / ALLoRA-0 step peak": f"{cost['allora_output']['step_peak_ratio']:.2f}x",
        "base model's average accuracy": f"{100 * a['base']['avg']:.1f}%",
        "LoRA+ average accuracy": f"{100 * a['main']['loraplus']['avg']['mean']:.1f} +/- "
        f"{100 * a['main']['loraplus']['avg']['half']:.1f}",
    }


def _long_citations() -> dict[str, str]:
    """The numbers the long run's findings quote, computed from the runs."""
    from benchmarks.record import load_runs

    a = _analysis(LONG)
    loss = {(c["a"], c["b"]): c["loss"] for c in a["comparisons"]}
    coefficient = a["main"]["allora"]["coefficient"]
    runs = list(load_runs(LONG).values())
    trained = [r for r in runs if "train" in r]
    collapsed = [r for r in trained if r["eval"]["boolq"]["acc"] < 0.5]  # the rest score 53% or more
    healthy = [r for r in trained if r["eval"]["boolq"]["acc"] >= 0.5]

    def nll_range(rs):
        values = [r["answer_loss"]["tasks"]["boolq"]["nll"] for r in rs]
        return f"{min(values):.2f}-{max(values):.2f}"

    def acc_range(rs):
        values = [r["eval"]["boolq"]["acc"] for r in rs]
        return f"{100 * min(values):.0f}-{100 * max(values):.0f}%"

    out = {
        "BoolQ answer loss, collapsed runs": nll_range(collapsed),
        "BoolQ answer loss, other runs": nll_range(healthy),
        "BoolQ accuracy, collapsed runs": acc_range(collapsed),
        "BoolQ accuracy, other runs": acc_range(healthy),
        "coefficient's lowest value": f"{coefficient['min_over_training']:.2f}",
        "coefficient's mean at the end": f"{coefficient['mean_end']:.2f}",
        "ALLoRA's largest row norm of BA": f"{coefficient['ba_row_norm_max_end']:.3f}",
        "ALLoRA-0's largest row norm of BA": f"{a['main']['allora0']['coefficient']['ba_row_norm_max_end']:.3f}",
        "compute, minutes": f"{sum(r['wall_s'] for r in runs) / 60:.0f} minutes",
        "runs": f"{len(runs)} runs",
    }
    for (a_, b, t), digits in {
        ("allora", "allora0", "piqa"): 4,
        ("allora", "allora0", "arc_easy"): 3,
        ("allora", "allora0", "boolq"): 3,
        ("allora", "lora", "arc_easy"): 3,
        ("allora", "lora", "piqa"): 4,
        ("allora", "dora", "arc_easy"): 3,
        ("allora", "dora", "piqa"): 4,
    }.items():
        d = loss[(a_, b)]["tasks"][t]["seeds"]
        out[f"{a_} - {b}, {t}"] = f"{d['mean']:+.{digits}f}"
        out[f"{a_} - {b}, {t}, interval over seeds"] = _iv(d, digits)
    for a_, b in (("allora", "allora0"), ("allora", "lora"), ("allora", "dora")):
        out[f"{a_} - {b}, average"] = f"{loss[(a_, b)]['seeds']['mean']:+.3f}"
        out[f"{a_} - {b}, average, interval over seeds"] = _iv(loss[(a_, b)]["seeds"], 3)
    out["allora0 - lora, arc_easy"] = f"{loss[('allora0', 'lora')]['tasks']['arc_easy']['seeds']['mean']:+.3f}"
    out["allora0 - lora, piqa"] = f"{loss[('allora0', 'lora')]['tasks']['piqa']['seeds']['mean']:+.4f}"
    for method in ("lora", "allora", "allora0", "dora"):
        out[f"{method}: median step time"] = f"{a['main'][method]['step_s']:.2f} s"
    return out


@RECORDED
@pytest.mark.parametrize("citations", [_full_citations, _long_citations], ids=["full", "long"])
def test_numbers_docs_cite_are_the_record(citations):
    """Each number docs/benchmarks.md quotes from a run, computed from that run, appears in the docs as quoted.

    A wrong or stale number fails here; rewording the findings around the numbers does not."""
    docs = DOCS.read_text()
    missing = {what: text for what, text in citations().items() if text not in docs}
    assert not missing, f"docs/benchmarks.md does not quote the record's numbers: {missing}"


def test_numbers_the_readme_quotes_are_those_of_the_checked_docs():
    """README's "What the benchmarks found" quotes only numbers that docs/benchmarks.md states (and the test above
    checks docs/benchmarks.md against the runs), so a stale or mistyped number in the README fails here."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What the benchmarks found", 1)[1].split("\n## ", 1)[0]
    docs = DOCS.read_text()
    numbers = set(re.findall(r"[-+]?\d+\.\d+|\d+e-\d+", section))
    assert numbers, "the README section quotes no numbers: has it moved?"
    missing = sorted(n for n in numbers if n not in docs)
    assert not missing, f"README quotes numbers docs/benchmarks.md does not state: {missing}"
