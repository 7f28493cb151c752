"""``python -m benchmarks.run --mode quick``: the whole benchmark pipeline on a tiny model folder, about two minutes.

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


def test_plans_and_grids():
    from benchmarks.plan import centred_grid
    from benchmarks.run import main

    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 3) == [1e-4, 2e-4, 4e-4]
    assert centred_grid((1e-4, 2e-4, 4e-4, 8e-4), 2e-4, 1) == [2e-4]
    assert main(["--mode", "full", "--dry-run", "--out", os.devnull + "-unused"]) == 0
    assert main(["--mode", "long", "--dry-run", "--out", os.devnull + "-unused"]) == 0
    with pytest.raises(SystemExit):
        main(["--mode", "quick", "--methods", "nope", "--dry-run"])
    for bad in ("nope", "loraplus"):  # unknown, and two learning rates: the cost phase has one AdamW per adapter
        with pytest.raises(SystemExit):
            main(["--mode", "quick", "--cost-methods", bad, "--dry-run"])


def test_a_run_of_part_of_the_plan_keeps_the_recorded_plan(tmp_path):
    """`--methods dora` on a second core must not replace OUT/plan.json (the record) by its one-method plan."""
    import json
    from dataclasses import asdict

    from benchmarks.plan import make_plan
    from benchmarks.run import is_part_of_recorded_plan

    assert not is_part_of_recorded_plan(tmp_path, make_plan("long"))  # nothing recorded yet
    (tmp_path / "plan.json").write_text(json.dumps(asdict(make_plan("long"))))
    assert is_part_of_recorded_plan(tmp_path, make_plan("long", methods=["dora"], seeds=[3]))
    assert not is_part_of_recorded_plan(tmp_path, make_plan("long", steps=100))  # another plan: it is recorded
    assert not is_part_of_recorded_plan(tmp_path, make_plan("long", methods=["rslora"]))  # a method beyond it


def test_long_preset_is_what_the_issue_asks():
    """Ten times the full mode's steps at the same batch, BoolQ-length sequences, the four methods, three seeds."""
    from benchmarks.methods import get_method
    from benchmarks.plan import PRESETS, make_plan, planned_specs

    long, full = PRESETS["long"], PRESETS["full"]
    assert long["steps"] * long["batch_size"] >= 10 * full["steps"] * full["batch_size"]
    assert long["steps"] >= 10 * full["steps"] and long["max_length"] >= 240  # BoolQ's 90th percentile
    plan = make_plan("long")
    assert set(plan.methods) == {"lora", "allora0", "allora_eta2_4", "dora"} and len(plan.seeds) == 3
    assert "boolq" in plan.tasks and plan.loss_limit >= 100
    assert get_method("lora").alpha_factor == 2.0 and get_method("lora").dropout == 0.05
    specs = planned_specs(plan)
    assert len(specs) == 1 + 4 * 3  # the base row and every method x seed, no selection runs
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
def test_quick_mode_end_to_end(tmp_path, tiny_model_dir):
    """The quick mode on a tiny model folder (``--model``): runs, report with held-out loss and intervals, resume."""
    out, docs = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--mode",
        "quick",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--out",
        str(out),
        "--docs",
        str(docs),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = sorted((out / "runs").glob("*.json"))
    names = {p.stem for p in runs}
    assert "report__base" in names
    assert "report__lora__adamw__lr0.0002__s1__n5" in names
    assert "report__allora_eta2_4__adamw__lr0.0002__s1__n5" in names
    assert any("__sgd__" in n and n.startswith("report__allora0") for n in names)
    for path in runs:
        data = json.loads(path.read_text())
        assert {"run_id", "spec", "eval", "avg_acc", "answer_loss", "wall_s", "versions"} <= set(data)
        assert data["spec"]["model"] == tiny_model_dir
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
            assert bool(train["coefficient"]) == data["spec"]["method"].startswith("allora_eta")

    text = docs.read_text()
    assert "python -m benchmarks.run --mode quick" in text and "Quick mode" in text
    assert f"* Model: `{tiny_model_dir}`, float32, on cpu." in text
    assert "| `lora` | 0.0002 |" in text and "| `allora_eta2_4` | 0.0002 |" in text
    assert "| before fine-tuning |" in text
    loss_rows = [line for line in text.splitlines() if line.startswith("| `allora_eta2_4` - `lora` | ")]
    assert len(loss_rows) == 3  # accuracy, held-out loss, and held-out loss on each task (one here)
    assert loss_rows[2].startswith("| `allora_eta2_4` - `lora` | arc_easy | ")
    low, high = (float(x) for x in re.search(r"\[([-+.\d]+), ([-+.\d]+)\] \| 1 \|", loss_rows[1]).groups())
    assert low < high  # a real interval over examples, from one seed
    assert "### Held-out answer loss" in text and "95% CI over examples" in text
    assert "### The coefficient and the row norms of BA over training" in text
    assert "Cost: step time and memory" in text and "`allora_eta2_4`: ALLoRA" in text
    assert "AdamW vs SGD" in text
    for png in ("accuracy", "answer_loss", "loss", "row_norm", "coefficient", "cost"):
        path = out / "plots" / f"{png}.png"
        assert path.is_file() and path.stat().st_size > 1000
        assert f"({os.path.relpath(path, docs.parent)})" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cores"] >= 1 and summary["versions"]["torch"]
    assert json.loads((out / "plan.json").read_text())["model"] == tiny_model_dir
    cost = json.loads((out / "cost.json").read_text())
    assert cost["device"] == "cpu" and set(cost["methods"]) == {"allora0", "allora_eta2_4", "dora"}

    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert [e["event"] for e in sessions] == ["start", "end"] and sessions[0]["command"].endswith(str(docs))
    assert "* Sessions (1, " in text

    # Resume: the same command again skips every finished run.
    again = subprocess.run(command + ["--no-cost"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skip (finished)") == len(runs)


def test_launch_bound_benchmark_runs(capsys):
    from benchmarks.launch_bound import main

    args = ["--device", "cpu", "--layers", "2", "--rounds", "2", "--steps", "2", "--no-compile"]
    assert main(args) == 0
    assert "eager" in capsys.readouterr().out
