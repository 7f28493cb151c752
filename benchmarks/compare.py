"""The benchmark command: ``python -m benchmarks.compare --mode quick|full|long [options]`` (from the repository root).

It trains and scores every method of a plan (``benchmarks/plan.py``) and writes a results folder ``OUT``: one JSON
per run under ``OUT/runs``, ``OUT/plan.json``, ``OUT/cost.json``, and the generated ``OUT/report.md``,
``OUT/summary.json`` and ``OUT/plots``. Without ``--out``, ``OUT`` is a new folder under ``benchmarks/results/``
(ignored by git); the committed record (``benchmarks/results-full``, ``benchmarks/results-long``) is written only when
named with ``--out``, and then only with runs it is missing: a folder holds one plan, and a command whose plan is
another stops (exit 2) before running anything. Rerunning the same command with the same ``--out`` skips every
finished run, so an interrupted run resumes where it stopped.

What it does, in order:

1. ``base``: the model before fine-tuning, on the reported questions (a reference row).
2. ``select``: every method at every learning rate of its grid, one seed, scored on the *selection* questions; the
   LR with the lowest held-out answer loss (or the best accuracy) is chosen (skipped when a grid has one LR).
3. ``report``: every method at its chosen LR, with several seeds, scored on the *reported* questions and the
   held-out answer loss.
4. ``optim``: ALLoRA (eta=2) against the same adapter without the coefficient (``allora0``), paired by seed, in the
   regimes of ``plan.OPTIM_REGIMES`` (AdamW and SGD, at the chosen LR and higher).
5. ``cost``: step time and memory of the methods interleaved on one model and batch (see ``benchmarks/cost.py``).
6. The report (``benchmarks/report.py``): tables and plots, no findings; people write those (docs/benchmarks.md).

``--dry-run`` prints the plan and a time estimate without running anything; ``python -m benchmarks.report --out
OUT`` rebuilds the report from finished runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from allora_trl.job.startup import configure_offline_run

from .methods import METHODS, OPTIM_PAIR
from .plan import (
    PRESETS,
    Plan,
    base_spec,
    choose_lr,
    make_plan,
    optim_specs,
    planned_specs,
    report_specs,
    selection_specs,
)
from .record import load_plan, load_runs, merge_plans, write_plan, write_run
from .single_run import BaseEvalSpec, resolve_device, run_base_eval, run_one

# Where a run writes without --out: a new folder per run under this one (ignored by git).
NEW_RESULTS_UNDER = Path("benchmarks/results")

logger = logging.getLogger("benchmarks")


def plan_from_args(args) -> Plan:
    """The preset of ``--mode`` with the command line's overrides."""
    overrides = {
        "tasks": _list(args.tasks),
        "methods": _list(args.methods),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr_points": args.lr_points,
        "seeds": _ints(args.seeds),
        "select_limit": args.select_limit,
        "report_limit": args.report_limit,
        "sgd_lr": args.sgd_lr,
        "cost_rounds": args.cost_rounds,
        "cost_methods": _list(args.cost_methods),
        "optim_seeds": _ints(args.optim_seeds),
        "optim_regimes": _list(args.optim_regimes),
        "warmup_steps": args.warmup_steps,
        "loss_limit": args.loss_limit,
        "select_by": args.select_by,
        "model": args.model,
    }
    if args.no_optim_study:
        overrides["optim_study"] = False
    if args.no_cost:
        overrides["cost"] = False
    if args.model:
        overrides["model"] = str(Path(args.model).resolve())
    device = resolve_device(args.device)
    overrides["device"] = device
    overrides["dtype"] = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if overrides["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {overrides['dtype']!r}")
    return make_plan(args.mode, **overrides)


def _list(value):
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _ints(value):
    return None if value is None else [int(v) for v in _list(value)]


# ----- the runs ----------------------------------------------------------------------------------------------------


def execute(
    spec,
    out_dir: Path,
    results: dict,
    counted: set,
    bar,
    eval_batch_size: int,
    device: str = "cpu",
    commit: str | None = None,
) -> dict:
    """Run ``spec`` unless ``results`` (the folder's finished runs) holds it; write and record a new run; advance the
    progress bar once per run (``counted``: the run ids already counted, a run shared by two phases counts once).

    A new run's JSON records ``commit``, the checkout it ran from (a long run spans sessions and commits).
    """
    if spec.run_id in counted:
        return results[spec.run_id]
    counted.add(spec.run_id)
    if spec.run_id in results:
        bar.update(1)
        bar.write(f"  skip (finished) {spec.run_id}")
        return results[spec.run_id]
    bar.set_postfix_str(spec.run_id)
    started = time.time()
    if isinstance(spec, BaseEvalSpec):
        data = run_base_eval(spec, eval_batch_size, device)
    else:
        data = run_one(spec, eval_batch_size, device)
    if commit:
        data["commit"] = commit
    write_run(out_dir, spec, data)
    results[spec.run_id] = data
    gc.collect()
    bar.update(1)
    accs = ", ".join(f"{t} {r['acc']:.3f}" for t, r in data["eval"].items())
    if "answer_loss" in data:
        accs += f"; held-out answer loss {data['answer_loss']['mean']:.4f}"
    if "train" in data:
        loss = data["train"]["loss"]
        bar.write(
            f"  done {spec.run_id}: loss {loss[0]:.3f} -> {data['train']['final_loss']:.3f}, acc {accs} "
            f"({time.time() - started:.0f} s, {data['train']['step_time_median_s']:.2f} s/step)"
        )
    else:
        bar.write(f"  done {spec.run_id}: acc {accs} ({time.time() - started:.0f} s)")
    return data


def log_session(out_dir: Path, **fields) -> None:
    """Append one JSON line to ``OUT/sessions.jsonl``: a run resumed over several sessions keeps each session's
    command, commit, start and (when it got to the end) wall time. ``pid`` pairs a session's end with its start
    when two processes share the folder."""
    fields = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(), **fields}
    with open(Path(out_dir) / "sessions.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(fields) + "\n")


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), recorded with a run; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            # the code, not the results folders a running benchmark writes itself
            ["git", "status", "--porcelain", "--", "benchmarks", "allora_trl", ":!benchmarks/results-*"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


# lm-eval seconds per question on a 2-core CPU (SmolLM2-135M, batch 32): long passages or four long endings cost more
QUESTION_SECONDS = {"boolq": 0.6, "hellaswag": 0.6, "piqa": 0.35}


def estimate_seconds(plan: Plan, specs, step_s: float = 2.4, question_s: float = 0.3, overhead_s: float = 12) -> float:
    """Rough wall time on a 2-core CPU: SmolLM2-135M, fp32, a training step of batch 8 padded to ~55-64 tokens takes
    about 2.4 s, proportionally more for longer padding; ``QUESTION_SECONDS`` per evaluated question. Measured on a
    2-core AMD EPYC VM (batch 4 x 64 tokens: 1.25-1.3 s a step; 50 questions each of arc_easy, boolq, piqa: 66 s)."""
    step_s *= plan.batch_size / 8 * max(1.0, plan.max_length / 64)
    per_question = sum(QUESTION_SECONDS.get(t, question_s) for t in plan.tasks)
    total = 0.0
    for spec in specs.values():
        total += overhead_s + (spec.eval_limit or 500) * per_question + getattr(spec, "steps", 0) * step_s
        total += len(plan.tasks) * plan.loss_limit * 0.15  # held-out loss: one forward per example
    if plan.cost:
        total += plan.cost_rounds * len(plan.cost_methods) * step_s * 1.3 + len(plan.cost_methods) * 40
    return total


def run_layer_benchmark(json_path: Path, quick: bool = False) -> bool:
    """``benchmarks/test_layer_speed.py`` under pytest-benchmark, its JSON saved for the report; False if it failed."""
    here = Path(__file__).resolve().parent
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(here / "test_layer_speed.py"),
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if quick:
        cmd += ["-k", "ratio or forward_backward"]
    env = dict(os.environ, ALLORA_LAYER_SPEED_JSON=str(Path(json_path).resolve()))
    proc = subprocess.run(cmd, cwd=here.parent, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ALLoRA / LoRA")), None)
    print("  " + (line or f"layer micro-benchmark failed (exit {proc.returncode}): {proc.stdout[-500:]}"))
    return proc.returncode == 0


def pick_threads(value: str) -> int:
    """Torch's thread count for the runs: a number, or 'auto' (all cores if idle, else 1)."""
    if value == "auto":
        try:
            busy = os.getloadavg()[0] >= 1.0  # another process already holds a core
        except OSError:
            busy = False
        threads = 1 if busy else (os.cpu_count() or 1)
    else:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise SystemExit(f"--threads must be a number >= 1 or 'auto', got {value!r}")
    return threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mode",
        choices=tuple(PRESETS),
        default="quick",
        help="quick: a few minutes, checks the pipeline; full: the benchmark (about two hours); "
        "long: 10x the steps, four methods, resumable across sessions",
    )
    parser.add_argument("--model", help="a local Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: the GPU when there is one)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="weights and autocast (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--tasks",
        help="comma-separated: boolq, piqa, socialiqa, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa (full and long default: arc_easy,boolq,piqa)",
    )
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument(
        "--out",
        help=f"results folder (default: a new folder under {NEW_RESULTS_UNDER}/). A folder that holds a plan takes "
        "only runs of that plan it is missing (more seeds or methods, or a part of it); another plan stops, exit 2",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, help="examples per optimizer step")
    parser.add_argument("--max-length", type=int, help="max tokens per training example (longer ones are skipped)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (then constant LR)")
    parser.add_argument("--lr-points", type=int, help="LRs per method grid (1 = each method's default, no selection)")
    parser.add_argument(
        "--select-by", choices=("loss", "acc"), help="what chooses the LR on the selection split (default: loss)"
    )
    parser.add_argument("--seeds", help="comma-separated seeds of the reported runs (e.g. full: 1,2,3)")
    parser.add_argument("--select-limit", type=int, help="selection questions per task")
    parser.add_argument("--report-limit", type=int, help="reported questions per task")
    parser.add_argument("--loss-limit", type=int, help="held-out answer-loss examples per task (0: not measured)")
    parser.add_argument("--optim-seeds", help="comma-separated seeds of the optimizer study")
    parser.add_argument(
        "--optim-regimes",
        help="comma-separated subset of adamw, adamw_high, sgd, sgd_high, "
        "sgd_matched, sgd_clip (see benchmarks/plan.py, OPTIM_REGIMES)",
    )
    parser.add_argument("--sgd-lr", type=float, help="SGD (momentum 0.9) learning rate of the 'sgd' regime")
    parser.add_argument("--no-optim-study", action="store_true", help="skip the optimizer study")
    parser.add_argument("--no-cost", action="store_true", help="skip the step-time / memory measurement")
    parser.add_argument("--cost-rounds", type=int, help="interleaved rounds of the cost measurement")
    parser.add_argument(
        "--cost-methods",
        help="comma-separated methods timed in the cost phase (ALLoRA-0, the reference, is always added; "
        "default: the mode's list)",
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads: a number, or 'auto' (default): one thread per core on an idle machine, "
        "1 when the 1-minute load average is already >= 1 (on a shared CPU, threads that wait on a "
        "busy core made steps 3-6x slower than one thread in our measurements)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_offline_run(
        noisy_level=logging.ERROR, also_noisy=("transformers", "peft", "trl", "accelerate")
    )  # one line per run is the progress report
    import warnings

    warnings.filterwarnings("ignore")

    threads = pick_threads(args.threads)
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out:
        out_dir = Path(args.out)
    else:
        out_dir = NEW_RESULTS_UNDER / f"{plan.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        while out_dir.exists():
            out_dir = out_dir.with_name(out_dir.name + "-1")
    recorded = load_plan(out_dir)
    try:
        folder_plan = plan if recorded is None else merge_plans(recorded, plan)
    except ValueError as exc:
        print(f"{out_dir} holds another plan ({exc}): nothing was run; choose another --out.", file=sys.stderr)
        return 2
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)

    specs = planned_specs(plan)
    n_select = len(selection_specs(plan))
    n_report = len(plan.methods) * len(plan.seeds)
    n_optim = len(specs) - 1 - n_select - n_report
    estimate = estimate_seconds(plan, specs)
    print(
        f"Plan ({plan.mode}): {len(plan.methods)} methods on {', '.join(plan.tasks)}; {n_select} selection runs, "
        f"{n_report} reported runs, about {n_optim} more for the optimizer study "
        f"({', '.join(plan.optim_regimes) if plan.optim_study else 'off'}); "
        f"{plan.steps} steps x batch {plan.batch_size}; cost measurement: {'on' if plan.cost else 'off'}."
    )
    print(
        "LR grids: "
        + "; ".join(
            f"{m} {plan.grid(m)}" if plan.lr_leader(m) == m else f"{m} as {plan.lr_leader(m)}" for m in plan.methods
        )
        + f" (chosen by {plan.select_by})"
    )
    print(
        f"Model: {plan.model or 'SmolLM2-135M-Instruct'}, {plan.dtype} on {plan.device}; torch threads: {threads} "
        f"({args.threads})"
    )
    print(
        f"Estimated time on a 2-core CPU: {estimate / 60:.0f} min. Results and report: {out_dir}"
        + ("" if recorded is None else " (its plan: this run adds what it is missing)")
    )
    if args.dry_run:
        return 0

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)

    out_dir.mkdir(parents=True, exist_ok=True)
    if folder_plan != recorded:  # a folder's plan.json changes only when a run adds to it
        write_plan(out_dir, folder_plan)
    started = time.time()
    commit = git_commit()
    log_session(out_dir, event="start", command=command, commit=commit, device=plan.device, threads=threads)
    results = load_runs(out_dir)
    run = dict(
        out_dir=out_dir,
        results=results,
        counted=set(),
        eval_batch_size=plan.eval_batch_size,
        device=plan.device,
        commit=commit,
    )
    with tqdm(total=len(specs), desc="benchmark runs", unit="run", dynamic_ncols=True, file=sys.stdout) as bar:
        bar.write("[base] the model before fine-tuning")
        execute(base_spec(plan), bar=bar, **run)
        if n_select:
            bar.write(f"[select] learning-rate grid on the selection questions (by {plan.select_by})")
        for spec in selection_specs(plan):
            execute(spec, bar=bar, **run)
        chosen = {m: choose_lr(plan, m, results) for m in plan.lr_grids}
        bar.write("[report] chosen LRs: " + ", ".join(f"{m} {chosen[m]:g}" for m in plan.methods))
        for spec in report_specs(plan, chosen):
            execute(spec, bar=bar, **run)
        optim = optim_specs(plan, chosen)
        bar.total = bar.n + len({s.run_id for _, s in optim} - run["counted"])  # the LRs are known now
        bar.refresh()
        if optim:
            bar.write(f"[optim] {OPTIM_PAIR[0]} vs {OPTIM_PAIR[1]}: " + ", ".join(plan.optim_regimes))
        for _, spec in optim:
            execute(spec, bar=bar, **run)
    if plan.cost:
        from .cost import measure_cost

        cost_path = out_dir / "cost.json"
        if cost_path.is_file():
            print(f"[cost] {cost_path} exists: kept (a measurement is never replaced; another --out measures anew)")
        else:
            print(f"[cost] {plan.cost_rounds} interleaved rounds of {', '.join(plan.cost_methods)}")
            cost = measure_cost(
                tuple(plan.tasks),
                plan.batch_size,
                plan.max_length,
                plan.cost_rounds,
                names=tuple(plan.cost_methods),
                profile_ops=plan.mode == "full",
                model=plan.model,
                dtype=plan.dtype,
                device=plan.device,
            )
            cost_path.write_text(json.dumps(cost, indent=1))
        layer_json = out_dir / "layer_speed.json"
        if not layer_json.is_file():
            print("[cost] layer micro-benchmark (pytest-benchmark)")
            run_layer_benchmark(layer_json, quick=plan.mode == "quick")
    wall = time.time() - started
    log_session(out_dir, event="end", wall_s=round(wall, 1))
    from .report import write_report

    write_report(out_dir, plan=folder_plan, command=command, wall_s=wall, commit=commit)
    print(
        f"\nDone in {wall / 60:.1f} min. Report: {out_dir / 'report.md'}\nRuns: {out_dir / 'runs'}  "
        f"Plots: {out_dir / 'plots'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
