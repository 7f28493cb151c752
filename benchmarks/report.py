"""The benchmark report: ``docs/benchmarks.md`` (Markdown), ``OUT/summary.json`` and the PNG plots, from the run files.

Rebuild it from finished runs without training anything: ``python -m benchmarks.report --out OUT --docs PATH``.
The work is split by job: ``analysis.py`` (numbers and intervals), ``plots.py`` (PNGs), ``markdown.py`` (text);
this module gathers the machine's description and writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

from .analysis import analyse, load_plan, load_runs
from .markdown import keep_findings, render
from .plots import make_plots
from .runner import versions


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
        mem = [x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")]
        info["memory_gib"] = round(int(mem[0].split()[1]) / 2**20, 1) if mem else None
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_report(
    out_dir: Path, docs_path: Path, plan=None, command: str = "", wall_s: float | None = None, commit: str | None = None
) -> dict:
    """Analyse the finished runs in ``out_dir``; write the Markdown, ``summary.json`` and the plots.

    Works on a partial run too (a long run between sessions): methods or seeds without runs are left out.
    """
    out_dir, docs_path = Path(out_dir), Path(docs_path)
    plan = plan or load_plan(out_dir)
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
    sessions_path = out_dir / "sessions.jsonl"
    sessions = [json.loads(line) for line in sessions_path.read_text().splitlines()] if sessions_path.is_file() else []
    starts = [event for event in sessions if event.get("event") == "start"]
    if starts and not command:  # a rebuild of a run that has not reached its end yet: its last session's command
        command, commit = starts[-1].get("command", ""), commit or starts[-1].get("commit")
    text, headline = render(
        plan,
        analysis,
        cost,
        plots,
        info,
        docs_path,
        command or "python -m benchmarks.run",
        wall_s,
        compute_s,
        versions(),
        layer,
        commit,
        sessions,
    )
    docs_path.write_text(keep_findings(text, docs_path))

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items() if k not in ("correct", "per_example")}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        return obj

    summary = {
        "command": command,
        "commit": commit,
        "machine": info,
        "versions": versions(),
        "wall_s": wall_s,
        "compute_s": compute_s,
        "plan": {k: v for k, v in vars(plan).items()},
        "analysis": clean(analysis),
        "cost": clean({k: v for k, v in (cost or {}).items() if k != "top_ops"}),
        "plots": plots,
        "docs": str(docs_path),
        "headline": headline,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the results folder of a benchmark run")
    parser.add_argument("--docs", required=True, help="where to write the Markdown report")
    parser.add_argument(
        "--command",
        default="",
        help="the command to show in the report (default: the one in OUT/summary.json, i.e. the run's own)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    # A rebuild (new report text, same runs) keeps the benchmark run's own command, wall time and commit.
    summary = write_report(
        out,
        Path(args.docs),
        command=args.command or previous.get("command", ""),
        wall_s=previous.get("wall_s"),
        commit=previous.get("commit"),
    )
    print(f"Report: {summary['docs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
