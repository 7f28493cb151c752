"""What `allora-trl train` reports about training: the held-out answer loss before and after, with its intervals,
in summary.json and in the log's last lines, computed as the benchmarks compute it."""

import json
import logging
import math
import random

import pytest

from allora_trl.cli import main
from allora_trl.job.evaluation import bootstrap_mean, compare_answer_loss


def test_intervals_are_the_benchmarks_bootstrap():
    """One task, one run: the job's intervals equal the benchmarks' example bootstrap, the change its paired one."""
    from benchmarks.stats import example_bootstrap_mean, question_bootstrap_diff

    rng = random.Random(3)
    before = [rng.uniform(1.0, 6.0) for _ in range(40)]
    after = [b - rng.uniform(-0.5, 1.5) for b in before]
    report = compare_answer_loss({"arc_easy": before}, {"arc_easy": after})["arc_easy"]
    for key, values in (("before", before), ("after", after)):
        expected = example_bootstrap_mean([[values]])
        assert {k: report[key][k] for k in ("mean", "low", "high")} == pytest.approx(expected, abs=1e-12)
        assert report[key]["n"] == 40
    expected = question_bootstrap_diff([([after], [before])])
    assert {k: report["change"][k] for k in ("mean", "low", "high")} == pytest.approx(expected, abs=1e-12)
    assert report["change"]["mean"] == pytest.approx(report["after"]["mean"] - report["before"]["mean"])
    assert report["change"]["low"] < report["change"]["mean"] < report["change"]["high"]


def test_bootstrap_mean_of_nothing_and_of_a_constant():
    assert bootstrap_mean([])["n"] == 0 and math.isnan(bootstrap_mean([])["mean"])
    assert bootstrap_mean([2.0] * 5) == {"mean": 2.0, "low": 2.0, "high": 2.0, "n": 5}


def test_train_reports_answer_loss_before_and_after_in_summary_and_log(tmp_path, tiny_model_dir, qa_dataset, caplog):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data)]
    argv += ["--max_steps", "4", "--per_device_train_batch_size", "4", "--lora_r", "4", "--learning_rate", "1e-2"]
    argv += ["--eval_tasks", "arc_easy", "--eval_limit", "6", "--eval_batch_size", "8"]
    with caplog.at_level(logging.INFO, logger="allora_trl"):
        assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after, change = (summary[f"answer_loss_{k}"]["arc_easy"] for k in ("before", "after", "change"))
    for value in (before, after, change):
        assert value["n"] == 6 and value["low"] <= value["mean"] <= value["high"]
    assert before["mean"] > 0 and after["mean"] > 0
    assert change["mean"] == pytest.approx(after["mean"] - before["mean"])
    assert after["mean"] != before["mean"]  # the adapter changed the model's belief in the gold answers

    lines = [r.getMessage() for r in caplog.records if r.name == "allora_trl"][-3:]
    assert lines[0].startswith("arc_easy accuracy: ")
    assert lines[1] == (
        f"arc_easy answer loss (nats; 95% CI over the 6 questions): {before['mean']:.3f} [{before['low']:.3f}, "
        f"{before['high']:.3f}] -> {after['mean']:.3f} [{after['low']:.3f}, {after['high']:.3f}], change "
        f"{change['mean']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]"
    )
    assert lines[2].startswith("Adapter, loss_curve.png and summary.json written to ")


def test_skip_eval_reports_no_answer_loss(tmp_path, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data)]
    assert main([*argv, "--max_steps", "1", "--per_device_train_batch_size", "2", "--skip_eval", "true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answer_loss_before"] == summary["answer_loss_after"] == summary["answer_loss_change"] == {}
