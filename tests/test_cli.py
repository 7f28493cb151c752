"""The `allora-trl train` command: option parsing, validation before anything is loaded, and a tiny full run."""

import json

import pytest

from allora_trl.cli import main
from allora_trl.job.arguments import TrainScriptArguments, build_parser


def parse(argv):
    return build_parser().parse_args_and_config(args=argv)


def test_defaults_are_the_cpu_main_job():
    script, args = parse([])
    assert script.model_name_or_path is None and script.train_tasks == "arc_easy"
    assert args.max_steps == 60 and args.allora_eta == 2.0 and args.allora_coefficient == "weight"
    assert args.bf16 is False or args.bf16 is None or args.use_cpu is False


def test_yaml_config_then_command_line_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("allora_eta: 1.0\nmax_steps: 7\nlora_r: 4\nlearning_rate: 0.001\n")
    script, args = parse(["--config", str(config), "--max_steps", "9"])
    assert args.allora_eta == 1.0 and args.max_steps == 9 and args.learning_rate == 0.001 and script.lora_r == 4


def test_unknown_yaml_key_fails(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("allora_etaa: 1.0\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "allora_etaa" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--allora_eta", "0"], "allora_eta"),
        (["--allora_coefficient", "rows"], "allora_coefficient"),
    ],
)
def test_bad_config_values_exit_2_naming_the_field(tmp_path, capsys, argv, message):
    try:
        code = main(["train", "--output_dir", str(tmp_path / "o"), *argv])
    except SystemExit as exc:  # argparse rejects values outside `choices` itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_name_or_path", "/nonexistent/model"], "model_name_or_path"),
        (["--dataset_path", "/nonexistent/data.jsonl"], "dataset_path"),
        (["--train_tasks", "arc_easy,mmlu"], "mmlu"),
        (["--eval_split", "train"], "eval_split"),
        (["--lora_r", "0"], "lora_r"),
    ],
)
def test_bad_paths_and_values_fail_before_training(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--output_dir", str(tmp_path / "o"), *argv])
    assert not (tmp_path / "o").exists()


def test_non_empty_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="overwrite_output_dir"):
        main(["train", "--output_dir", str(out)])
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_malformed_dataset_fails_before_the_model_is_loaded(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(SystemExit, match="prompt.*completion"):
        main(["train", "--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_model_dir,
              "--dataset_path", str(data), "--skip_eval", "true"])
    assert not (tmp_path / "o").exists()


def test_full_run_on_a_tiny_model_writes_adapter_plot_and_summary(tmp_path, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    code = main(["train", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data),
                 "--max_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4",
                 "--eval_tasks", "arc_easy", "--eval_limit", "4", "--eval_batch_size", "8", "--allora_eta", "1.5"])
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 4 and config["lora_dropout"] == 0
    assert json.loads((out / "allora_config.json").read_text())["eta"] == 1.5
    assert (out / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"]["arc_easy"]["n"] == 4 and 0 <= summary["accuracy_after"]["arc_easy"]["acc"] <= 1
    assert summary["allora_stats_last"]["allora/coefficient_max"] <= 1.5
    assert summary["train_loss_last"] is not None


def test_script_arguments_document_every_field():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainScriptArguments))


def test_example_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "example_configs").glob("*.yaml"))
    assert configs
    for config in configs:
        script, args = parse(["--config", str(config)])
        assert args.allora_eta > 0 and script.lora_r > 0, config


def test_usage_names_the_command_and_where_the_benchmarks_are(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "allora-trl train" in usage and "python -m benchmarks.run" in usage


def test_train_without_the_job_extra_names_the_extra(monkeypatch, capsys):
    import allora_trl.cli as cli

    monkeypatch.setattr(cli, "JOB_MODULES", {"lm_eval": "lm-eval", "no_such_module_xyz": "no-such-req"})
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "no-such-req" in err and 'allora-trl[job]' in err and "lm-eval" not in err.split("(")[1].split(")")[0]
