"""``python -m benchmarks.compare --mode quick``: the whole benchmark pipeline on a tiny model folder, about two minutes.

Checks that the outputs are well-formed (run JSONs, the Markdown tables with the held-out loss and its intervals, the
plots, resuming), not what the numbers are. Also fast checks of the pieces the numbers rest on: the held-out loss
against a direct computation, one registry for accuracy and cost, the plans and the LR choice, the statistics.
"""

import json
import math
import os
import re
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


def test_plans_and_grids(capsys):
    from benchmarks.compare import main
    from benchmarks.plan import centred_grid

    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 3) == [1e-4, 2e-4, 4e-4]
    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 1) == [2e-4]
    assert main(["--mode", "full", "--dry-run", "--out", os.devnull + "-unused"]) == 0
    capsys.readouterr()
    for mode in ("full", "long"):  # without --out: a new folder, never the committed record
        assert main(["--mode", mode, "--dry-run"]) == 0
        out = re.search(r"Results and report: (\S+)", capsys.readouterr().out).group(1)
        assert Path(out).parent == Path("benchmarks/results") and Path(out).name.startswith(f"{mode}-")
    with pytest.raises(SystemExit):
        main(["--mode", "quick", "--methods", "nope", "--dry-run"])
    for bad in ("nope", "loraplus"):  # unknown, and two learning rates: the cost phase has one AdamW per adapter
        with pytest.raises(SystemExit):
            main(["--mode", "quick", "--cost-methods", bad, "--dry-run"])


def test_a_folder_takes_parts_and_extensions_of_its_plan_only():
    """`--methods dora` on a second core keeps the folder's plan; `--seeds 1,...,6` adds a seed to it; another
    setting (more steps) is another plan and is refused, naming the field."""
    from benchmarks.plan import make_plan
    from benchmarks.record import merge_plans

    recorded = make_plan("long")
    assert merge_plans(recorded, make_plan("long", methods=["dora"], seeds=[3], cost=False)) == recorded
    wider = merge_plans(recorded, make_plan("long", seeds=[6], methods=["dora", "rslora"]))
    assert wider.seeds == [1, 2, 3, 4, 5, 6] and wider.methods == ["lora", "allora0", "allora", "dora", "rslora"]
    assert wider.lr_grids["rslora"] and wider.lr_grids["lora"] == recorded.lr_grids["lora"]
    with pytest.raises(ValueError, match="steps 100, recorded 240"):
        merge_plans(recorded, make_plan("long", steps=100))


def test_run_ids_cover_the_whole_spec():
    """Two specs that differ in any field (here the held-out loss sample, which no readable part of the id names)
    never share a run id, so a run cannot be taken for, or written over, another."""
    from dataclasses import replace

    from benchmarks.plan import make_plan, spec_for

    spec = spec_for(make_plan("full"), "lora", 2e-4, 1, "report")
    assert spec.run_id == spec_for(make_plan("full"), "lora", 2e-4, 1, "report").run_id
    assert spec.run_id.startswith("report__lora__adamw__lr0.0002__s1__n24__")
    others = [replace(spec, loss_limit=0), replace(spec, sampling="group_by_length"), replace(spec, eval_limit=10)]
    assert len({spec.run_id, *(o.run_id for o in others)}) == 4


def test_a_finished_run_is_never_replaced(tmp_path):
    from benchmarks.plan import make_plan, spec_for
    from benchmarks.record import load_runs, write_run

    spec = spec_for(make_plan("quick"), "lora", 2e-4, 1, "report")
    write_run(tmp_path, spec, {"spec": spec.to_json(), "run_id": spec.run_id, "avg_acc": 0.5})
    with pytest.raises(FileExistsError):
        write_run(tmp_path, spec, {"spec": spec.to_json(), "run_id": spec.run_id, "avg_acc": 0.6})
    assert load_runs(tmp_path)[spec.run_id]["avg_acc"] == 0.5


def test_long_preset_is_what_the_issue_asks():
    """Ten times the full mode's steps at the same batch, BoolQ-length sequences, the four methods, five seeds (the
    recorded long run's plan: tests/test_benchmark_record.py)."""
    from benchmarks.methods import get_method
    from benchmarks.plan import PRESETS, make_plan, planned_specs

    long, full = PRESETS["long"], PRESETS["full"]
    assert long["steps"] * long["batch_size"] >= 10 * full["steps"] * full["batch_size"]
    assert long["steps"] >= 10 * full["steps"] and long["max_length"] >= 240  # BoolQ's 90th percentile
    plan = make_plan("long")
    assert set(plan.methods) == {"lora", "allora0", "allora", "dora"} and plan.seeds == [1, 2, 3, 4, 5]
    assert "boolq" in plan.tasks and plan.loss_limit >= 100
    assert get_method("lora").alpha_factor == 2.0 and get_method("lora").dropout == 0.05
    specs = planned_specs(plan)
    assert len(specs) == 1 + 4 * 5  # the base row and every method x seed, no selection runs
    assert all(s.split == "report" and s.loss_limit == plan.loss_limit for s in specs.values())


def test_learning_rate_chosen_by_the_lowest_selection_loss():
    from benchmarks.plan import choose_lr, make_plan, spec_for

    plan = make_plan("full", methods=["lora"])
    assert plan.select_by == "loss"
    grid = plan.grid("lora")
    losses = dict(zip(grid, (3.0, 2.5, 2.9, 3.1)))
    accs = dict(zip(grid, (0.9, 0.1, 0.1, 0.1)))  # accuracy would choose another LR
    results = {
        spec_for(plan, "lora", lr, plan.select_seed, "select").run_id: {
            "answer_loss": {"mean": losses[lr]},
            "avg_acc": accs[lr],
        }
        for lr in grid
    }
    assert choose_lr(plan, "lora", results) == grid[1]
    plan.select_by = "acc"
    assert choose_lr(plan, "lora", results) == grid[0]


def test_cost_adapters_are_the_registry_adapters(tiny_model_dir):
    """The cost table measures the same adapters as the accuracy table (a second registry gave DoRA dropout 0)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.cost import REFERENCE, _build
    from benchmarks.methods import OPTIM_PAIR, get_method

    names = [REFERENCE, "lora", OPTIM_PAIR[0], "allora_output", "dora"]
    model, _ = _build(AutoModelForCausalLM.from_pretrained(tiny_model_dir), names)
    for name in names:
        want = get_method(name).lora_config()
        got = model.peft_config[name]
        assert (got.lora_alpha, got.lora_dropout, got.use_dora) == (
            want.lora_alpha,
            want.lora_dropout,
            want.use_dora,
        ), name
    assert model.peft_config["dora"].lora_dropout == 0.05


def test_answer_loss_is_the_gold_completions_mean_nll(tiny_model_dir):
    """Left-padded batches with ``logits_to_keep`` give each example's own full-sequence NLL of its answer tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.data import answer_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"prompt": "Question: What colour is the sky?\nAnswer:", "completion": " blue"},
        {"prompt": "Question: colour?\nAnswer:", "completion": " a very long green and yellow answer"},
        {"prompt": "Q:", "completion": " red"},
    ]
    model.train()
    batched = answer_nll(model, tokenizer, rows, batch_size=3)
    assert model.training  # scored in eval mode (no dropout), training mode given back
    model.eval()
    for row, value in zip(rows, batched):
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        n = len(ids) - len(tokenizer(row["prompt"])["input_ids"])
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        nll = -logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[-n:, 0].mean()
        assert value == pytest.approx(float(nll), abs=1e-4)
    # a long prompt is cut from the left: the answer is still scored in full
    long = [{"prompt": "Question: " + "very " * 200 + "long?\nAnswer:", "completion": " blue"}]
    assert math.isfinite(answer_nll(model, tokenizer, long, max_length=32)[0])


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path, tiny_model_dir):
    """The quick mode on a tiny model folder (``--model``): runs, report with held-out loss and intervals, resume."""
    from benchmarks.methods import get_method

    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "benchmarks.compare",
        "--mode",
        "quick",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = sorted((out / "runs").glob("*.json"))
    names = {p.stem.rpartition("__")[0] for p in runs}  # without the spec's digest
    assert "report__base" in names
    assert "report__lora__adamw__lr0.0002__s1__n5" in names
    assert "report__allora__adamw__lr0.0002__s1__n5" in names
    assert any("__sgd__" in n and n.startswith("report__allora0") for n in names)
    for path in runs:
        data = json.loads(path.read_text())
        assert {"run_id", "spec", "eval", "avg_acc", "answer_loss", "wall_s", "versions"} <= set(data)
        assert data["spec"]["model"] == tiny_model_dir and path.stem == data["run_id"]
        assert data["eval"]["arc_easy"]["n"] == 16 and len(data["eval"]["arc_easy"]["correct"]) == 16
        loss = data["answer_loss"]["tasks"]["arc_easy"]
        assert loss["n"] == 32 and len(loss["per_example"]) == 32 and all(x > 0 for x in loss["per_example"])
        assert data["answer_loss"]["mean"] == pytest.approx(sum(loss["per_example"]) / 32)
        assert 0.0 <= data["avg_acc"] <= 1.0
        if "train" in data:
            train = data["train"]
            assert {"loss", "row_norms", "coefficient", "grad_norm", "step_time_median_s", "diverged"} <= set(train)
            assert len(train["loss"]) == 5 and len(train["row_norms"]) == 6
            assert train["row_norms"][0]["ba_row_norm_max"] == 0.0 < train["row_norms"][-1]["ba_row_norm_max"]
            assert bool(train["coefficient"]) == (get_method(data["spec"]["method"]).trainer == "allora")

    text = (out / "report.md").read_text()
    assert "python -m benchmarks.compare --mode quick" in text and "Quick mode" in text
    assert f"* Model: `{tiny_model_dir}`, float32, on cpu." in text
    assert "| `lora` | 0.0002 |" in text and "| `allora` | 0.0002 |" in text
    assert "| before fine-tuning |" in text
    loss_rows = [line for line in text.splitlines() if line.startswith("| `allora` - `lora` | ")]
    assert len(loss_rows) == 3  # accuracy, held-out loss, and held-out loss on each task (one here)
    assert loss_rows[2].startswith("| `allora` - `lora` | arc_easy | ")
    low, high = (float(x) for x in re.search(r"\[([-+.\d]+), ([-+.\d]+)\] \| 1 \|", loss_rows[1]).groups())
    assert low < high  # a real interval over examples, from one seed
    assert "## Held-out answer loss" in text and "95% CI over examples" in text
    assert "### The coefficient and the row norms of BA" in text
    assert "Cost: step time and memory" in text and "`allora`: ALLoRA" in text
    assert "## Optimizer study" in text and "SGD (momentum 0.9), no clipping" in text
    assert "* `rslora`" not in text  # method notes only for the methods that ran
    for png in ("accuracy", "answer_loss", "loss", "row_norm", "coefficient", "cost"):
        path = out / "plots" / f"{png}.png"
        assert path.is_file() and path.stat().st_size > 1000
        assert f"(plots/{png}.png)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cores"] >= 1 and summary["versions"]["torch"]
    assert json.loads((out / "plan.json").read_text())["model"] == tiny_model_dir
    cost = json.loads((out / "cost.json").read_text())
    assert cost["device"] == "cpu" and set(cost["methods"]) == {"allora0", "allora", "dora"}

    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert [e["event"] for e in sessions] == ["start", "end"] and sessions[0]["command"].endswith(str(out))
    assert "* Sessions (1, " in text

    # Resume: the same command again skips every finished run.
    again = subprocess.run(command + ["--no-cost"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skip (finished)") == len(runs)


@pytest.mark.parametrize("model", ["stack", "llama"])
def test_launch_bound_benchmark_prints_positive_ratios(capsys, model):
    """One line per variant, ``  eager    1.234  [name 1.234 ...]  (...)``: each time ratio to LoRA before the
    parenthesis parses and is positive; for a stack of LoRA layers and for a tiny Llama."""
    from benchmarks.launch_bound import main

    args = ["--device", "cpu", "--layers", "2", "--rounds", "2", "--steps", "2", "--no-compile", "--model", model]
    assert main(args) == 0
    lines = re.findall(r"^\s+(eager|compiled)\s+([^(]*)\(", capsys.readouterr().out, re.MULTILINE)
    assert [label for label, _ in lines] == ["eager"], lines
    ratios = [float(word) for word in lines[0][1].split() if not word.isalpha()]  # words name the later ratios
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios), lines


def test_gpu_speed_script_runs_on_a_tiny_shape(tmp_path):
    """The lent-GPU script (benchmarks/gpu_speed.py), checked here on a CPU so that its one GPU run does not fail:
    every method's ratio to LoRA is recorded, eager and compiled, in the JSON file it writes."""
    from benchmarks.gpu_speed import main

    out = tmp_path / "speed.json"
    args = ["--shapes", "tiny", "--compile-shapes", "", "--device", "cpu", "--rounds", "2", "--steps", "1"]
    assert main([*args, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    (result,) = record["results"]
    assert result["shape"] == "tiny" and not result["compiled"] and result["lora_step_ms"] > 0
    for method in ("allora", "allora_update"):
        assert math.isfinite(result[method]["median"]) and result[method]["median"] > 0
