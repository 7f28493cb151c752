"""The benchmark report of a results folder: ``OUT/report.md``, ``OUT/summary.json`` and the PNGs in ``OUT/plots``.

Rebuild it from the finished runs without training anything: ``python -m benchmarks.report --out OUT``.
The work is split by job: ``analysis.py`` (numbers and intervals), ``plots.py`` (PNGs), ``markdown.py`` (tables);
this module gathers the machine's description and writes the files. It writes nothing outside ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

from .analysis import analyse
from .markdown import render
from .plots import make_plots
from .record import load_cost, load_plan, load_runs


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


def run_versions(runs: dict) -> dict[str, str]:
    """The library versions the runs recorded (several values joined by " / " when sessions differed)."""
    found: dict[str, list[str]] = {}
    for run in runs.values():
        for name, version in run.get("versions", {}).items():
            found.setdefault(name, [])
            if version not in found[name]:
                found[name].append(version)
    return {name: " / ".join(values) for name, values in found.items()}


def write_report(
    out_dir: Path,
    plan=None,
    command: str = "",
    wall_s: float | None = None,
    commit: str | None = None,
    machine_info: dict | None = None,
) -> dict:
    """Analyse the finished runs in ``out_dir``; write ``report.md``, ``summary.json`` and the plots there.

    Works on a partial run too (a long run between sessions): methods or seeds without runs are left out.
    ``machine_info``: the machine that ran them (default: this one).
    """
    out_dir = Path(out_dir)
    plan = plan or load_plan(out_dir)
    runs = load_runs(out_dir)
    cost = load_cost(out_dir) if plan.cost else None
    analysis = analyse(plan, runs)
    plots = make_plots(plan, runs, analysis, cost, out_dir / "plots")
    info = machine_info or machine()
    compute_s = sum(r.get("wall_s", 0) for r in runs.values())
    layer_path = out_dir / "layer_speed.json"
    layer = json.loads(layer_path.read_text()) if layer_path.is_file() else None
    sessions_path = out_dir / "sessions.jsonl"
    sessions = [json.loads(line) for line in sessions_path.read_text().splitlines()] if sessions_path.is_file() else []
    starts = [event for event in sessions if event.get("event") == "start"]
    if starts and not command:  # a rebuild of a run that has not reached its end yet: its last session's command
        command, commit = starts[-1].get("command", ""), commit or starts[-1].get("commit")
    versions = run_versions(runs)
    text = render(
        plan,
        analysis,
        cost,
        plots,
        info,
        out_dir,
        command or "python -m benchmarks.compare",
        wall_s,
        compute_s,
        versions,
        layer,
        commit,
        sessions,
    )
    (out_dir / "report.md").write_text(text)

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
        "versions": versions,
        "wall_s": wall_s,
        "compute_s": compute_s,
        "plan": {k: v for k, v in vars(plan).items()},
        "analysis": clean(analysis),
        "cost": clean({k: v for k, v in (cost or {}).items() if k != "top_ops"}),
        "plots": {name: os.path.relpath(path, out_dir) for name, path in plots.items()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the results folder of a benchmark run")
    parser.add_argument(
        "--command",
        default="",
        help="the command to show in the report (default: the one in OUT/summary.json, i.e. the run's own)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    # A rebuild (new report text, same runs) keeps the benchmark run's own command, wall time, commit and machine.
    write_report(
        out,
        command=args.command or previous.get("command", ""),
        wall_s=previous.get("wall_s"),
        commit=previous.get("commit"),
        machine_info=previous.get("machine"),
    )
    print(f"Report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
