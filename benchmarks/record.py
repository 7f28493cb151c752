"""A results folder (``OUT``): its run files (``OUT/runs/<run id>.json``), ``plan.json`` and ``cost.json``.

Everything that reads or writes these files goes through here. A run file is never replaced: its name is its run id,
which covers the whole spec, so a run with other settings is another file. A folder holds one plan: a run of the
command may do part of it or add methods and seeds to it (:func:`merge_plans`), never change what it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from .methods import METHODS
from .plan import OPTIM_REGIMES, Plan
from .single_run import BaseEvalSpec, RunSpec

# The committed record (benchmarks/results-full, benchmarks/results-long) predates today's names and fields: it names
# ALLoRA by eta^2 (`allora_eta2_4` is eta = 2) and results-full/cost.json calls ALLoRA-0 `lora0`, and it leaves out the
# fields its runs had at the values below. Reading a folder maps both, here and nowhere else.
RECORDED_NAMES = {
    "allora_eta2_4": "allora",
    "allora_eta2_1": "allora_eta1",
    "allora_eta2_2": "allora_eta_sqrt2",
    "lora0": "allora0",
}
RECORDED_DEFAULTS = {
    "model": None,
    "dtype": "float32",
    "loss_limit": 0,
    "loss_max_length": 512,
    "sampling": "random",
    "select_by": "acc",
    "fixed_lrs": {},
    "device": "cpu",
}

# What a run of the command may narrow down or widen and still belong to the folder's plan: `--methods dora` on a
# second core, `--seeds 1,2,3,4,5,6` to extend, `--no-cost` on a resume. Every other field must be the recorded one.
PART_FIELDS = (
    "methods",
    "seeds",
    "lr_grids",
    "lr_shared",
    "cost_methods",
    "optim_seeds",
    "optim_regimes",
    "optim_study",
    "cost",
)


def _current_names(obj):
    """``obj`` (JSON) with the record's method names mapped to today's, in keys, values and run ids."""
    if isinstance(obj, dict):
        return {_current_names(k): _current_names(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_current_names(v) for v in obj]
    if isinstance(obj, str):
        return "__".join(RECORDED_NAMES.get(part, part) for part in obj.split("__"))
    return obj


def _with_defaults(cls, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {**{k: v for k, v in RECORDED_DEFAULTS.items() if k in names}, **_current_names(data)}


def spec_from_json(data: dict) -> RunSpec | BaseEvalSpec:
    cls = RunSpec if "method" in data else BaseEvalSpec
    values = _with_defaults(cls, data)
    values["tasks"] = tuple(values["tasks"])
    return cls(**values)


def load_runs(out_dir: Path) -> dict[str, dict]:
    """Every finished run in ``OUT/runs`` by its run id (from its spec, whatever the file is called)."""
    runs = {}
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        spec = spec_from_json(data["spec"])
        data.update(spec=spec.to_json(), run_id=spec.run_id)
        if isinstance(data.get("method"), dict):
            data["method"] = _current_names(data["method"])
        runs[spec.run_id] = data
    return runs


def write_run(out_dir: Path, spec, data: dict) -> Path:
    """Write a finished run atomically (a file holds a whole run or does not exist); an existing file is an error."""
    path = Path(out_dir) / "runs" / f"{spec.run_id}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists: a finished run is never replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, default=float)
    os.replace(tmp, path)
    return path


def load_plan(out_dir: Path) -> Plan | None:
    """The plan a results folder was made with (``OUT/plan.json``); None if it has none."""
    path = Path(out_dir) / "plan.json"
    return Plan(**_with_defaults(Plan, json.loads(path.read_text()))) if path.is_file() else None


def write_plan(out_dir: Path, plan: Plan) -> None:
    (Path(out_dir) / "plan.json").write_text(json.dumps(asdict(plan), indent=1))


def load_cost(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "cost.json"
    return _current_names(json.loads(path.read_text())) if path.is_file() else None


def merge_plans(recorded: Plan, new: Plan) -> Plan:
    """The folder's plan once ``new`` has run in it: ``recorded`` with ``new``'s methods, seeds, regimes and cost
    methods added. Raises ValueError naming the fields in which ``new`` is another plan."""
    old, now = asdict(recorded), asdict(new)
    differ = [k for k in now if k not in PART_FIELDS and now[k] != old[k]]
    if differ:
        raise ValueError("; ".join(f"{k} {now[k]!r}, recorded {old[k]!r}" for k in differ))
    merged = dict(old)
    merged["methods"] = [m for m in METHODS if m in {*old["methods"], *now["methods"]}]
    merged["seeds"] = sorted({*old["seeds"], *now["seeds"]})
    merged["optim_seeds"] = sorted({*old["optim_seeds"], *now["optim_seeds"]})
    merged["optim_regimes"] = [r for r in OPTIM_REGIMES if r in {*old["optim_regimes"], *now["optim_regimes"]}]
    merged["cost_methods"] = old["cost_methods"] + [m for m in now["cost_methods"] if m not in old["cost_methods"]]
    grids = {**now["lr_grids"], **old["lr_grids"]}
    merged["lr_grids"] = {m: grids[m] for m in METHODS if m in grids}
    merged["lr_shared"] = {**now["lr_shared"], **old["lr_shared"]}
    merged["cost"] = old["cost"] or now["cost"]
    merged["optim_study"] = old["optim_study"] or now["optim_study"]
    return Plan(**merged)
