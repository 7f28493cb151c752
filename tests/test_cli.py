"""The `allora-trl train` command: option parsing, validation before anything is loaded, and a tiny full run."""

import json
import subprocess
import sys

import pytest
import torch

from allora_trl.cli import main
from allora_trl.job.arguments import TrainScriptArguments, build_parser, validate


def parse(argv):
    return build_parser().parse_args_and_config(args=argv)


def run(argv, capsys):
    """Run the command; return its exit status and stderr (argparse's errors exit from inside the parser)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_usage_error(code, err, *needles):
    """Exit status 2, one line of error (after at most a short usage line), no traceback, naming each needle."""
    assert code == 2, err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]  # not datasets' progress bars
    assert "Traceback" not in err and len(lines) <= 2 and lines[-1].startswith("allora-trl train: error:"), err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


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
def test_bad_paths_and_values_fail_before_training(tmp_path, capsys, argv, message):
    assert_usage_error(*run(["train", "--output_dir", str(tmp_path / "o"), *argv], capsys), message)
    assert not (tmp_path / "o").exists()


def test_non_empty_output_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_usage_error(*run(["train", "--output_dir", str(out)], capsys), "overwrite_output_dir")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "a", "answer": "b"}\n', "'prompt' + 'completion'"),
        ('{"prompt": "Q: sky?"}\n{"prompt": "Q: grass?"}\n', "'prompt' needs its 'completion'"),  # TRL: KeyError
        ("", "is empty"),
        ('{"text": ""}\n{"text": "  "}\n', "every row's 'text' is empty"),
        ('{"prompt": "a", "completion": ""}\n', "every row's 'completion' is empty"),
        ('{"prompt": "a", "completion": \n', "could not be read as json"),
    ],
)
def test_unusable_dataset_fails_before_the_model_is_loaded(tmp_path, capsys, monkeypatch, content, message):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    model_dir = tmp_path / "model"  # passes the path checks; loading it would fail, and must not be tried
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    code, err = run(
        [
            "train",
            "--output_dir",
            str(tmp_path / "o"),
            "--model_name_or_path",
            str(model_dir),
            "--dataset_path",
            str(data),
            "--skip_eval",
            "true",
        ],
        capsys,
    )
    assert_usage_error(code, err, "dataset_path", message)
    assert not (tmp_path / "o").exists()


def test_empty_dataset_folder_is_a_one_line_error(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "data").mkdir()
    code, err = run(
        [
            "train",
            "--output_dir",
            str(tmp_path / "o"),
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_path",
            str(tmp_path / "data"),
            "--skip_eval",
            "true",
        ],
        capsys,
    )
    assert_usage_error(code, err, "dataset_path", "save_to_disk")
    assert not (tmp_path / "o").exists()


def test_misspelt_target_module_fails_after_loading_before_anything_is_written(
    tmp_path, capsys, tiny_model_dir, qa_dataset, monkeypatch
):
    import allora_trl.job.evaluation as evaluation

    monkeypatch.setattr(evaluation, "held_out_docs", lambda *a, **k: pytest.fail("evaluated first"))
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    code, err = run(
        [
            "train",
            "--output_dir",
            str(tmp_path / "o"),
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_path",
            str(data),
            "--lora_target_modules",
            "q_proj,v_porj",
        ],
        capsys,
    )
    assert_usage_error(code, err, "lora_target_modules", "'v_porj'", "v_proj", "o_proj")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "yaml_text, needles",
    [
        ("allora_eta: true\n", ["allora_eta", "boolean"]),
        ("max_steps: [1\n", ["not valid YAML", "line"]),
        ("- max_steps\n", ["YAML mapping"]),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, yaml_text, needles):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert_usage_error(*run(["train", "--config", str(config), "--output_dir", str(tmp_path / "o")], capsys), *needles)
    assert not (tmp_path / "o").exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert_usage_error(*run(["train", "--config", str(tmp_path / "nope.yaml")], capsys), "--config", "does not exist")


def test_eval_split_that_a_task_lacks_is_refused_before_loading(tmp_path, capsys):
    code, err = run(
        ["train", "--eval_tasks", "arc_easy,piqa", "--eval_split", "test", "--output_dir", str(tmp_path / "o")], capsys
    )
    assert_usage_error(code, err, "eval_split", "piqa", "validation")


def test_unwritable_output_dir_is_refused_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_usage_error(*run(["train", "--output_dir", str(blocker / "run")], capsys), "output_dir", "is a file")
    assert_usage_error(*run(["train", "--output_dir", str(blocker)], capsys), "output_dir", "not a folder")


def checkpoint(folder, step):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return str(path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--resume_from_checkpoint"], "latest"),  # the bare form the docs and the refusal message give
        (["--resume_from_checkpoint", "true"], "latest"),
        (["--resume_from_checkpoint", "True"], "latest"),
        (["--resume_from_checkpoint", "--max_steps", "3"], "latest"),
        (["--resume_from_checkpoint", "CHECKPOINT-2"], "given"),
    ],
)
def test_resume_from_checkpoint_forms_resolve_to_a_checkpoint(tmp_path, argv, expected):
    out = tmp_path / "o"
    older, latest = checkpoint(out, 2), checkpoint(out, 10)
    argv = [older if a == "CHECKPOINT-2" else a for a in argv]
    script, args = parse(["--output_dir", str(out), *argv])
    validate(script, args)
    assert args.resume_from_checkpoint == (latest if expected == "latest" else older)


def test_resume_in_yaml_as_a_boolean(tmp_path):
    out = tmp_path / "o"
    latest = checkpoint(out, 4)
    config = tmp_path / "c.yaml"
    config.write_text(f"resume_from_checkpoint: true\noutput_dir: {out}\n")
    script, args = parse(["--config", str(config)])
    validate(script, args)
    assert args.resume_from_checkpoint == latest


def test_resume_false_does_not_slip_past_the_non_empty_output_dir_guard(tmp_path, capsys):
    out = tmp_path / "o"
    checkpoint(out, 2)
    code, err = run(["train", "--output_dir", str(out), "--resume_from_checkpoint", "false"], capsys)
    assert_usage_error(code, err, "overwrite_output_dir", "--resume_from_checkpoint (no value")


@pytest.mark.parametrize("value, message", [("true", "no checkpoint-"), ("/nonexistent/ckpt", "does not exist")])
def test_resume_without_a_checkpoint_names_a_form_that_works(tmp_path, capsys, value, message):
    code, err = run(["train", "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", value], capsys)
    assert_usage_error(code, err, "resume_from_checkpoint", message)


def test_resume_run_continues_from_the_latest_checkpoint(tmp_path, capsys, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    common = tiny_run_argv(out, tiny_model_dir, data, "--save_strategy", "steps", "--save_steps", "2")
    assert main([*common, "--max_steps", "2"]) == 0
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0  # a mark that only a run resumed from this checkpoint can report
    state_file.write_text(json.dumps(state))
    assert main([*common, "--max_steps", "3", "--resume_from_checkpoint"]) == 0
    history = json.loads((out / "summary.json").read_text())["log_history"]
    assert [(row["step"], row["loss"] == 123.0) for row in history if "loss" in row] == [
        (1, True),
        (2, False),
        (3, False),
    ]


def test_full_run_on_a_tiny_model_writes_adapter_plot_and_summary(tmp_path, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    old_checkpoint = checkpoint(out, 99)  # an earlier run's: --overwrite_output_dir must not leave it beside this one
    code = main(
        [
            "train",
            "--output_dir",
            str(out),
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_path",
            str(data),
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--lora_r",
            "4",
            "--eval_tasks",
            "arc_easy",
            "--eval_limit",
            "4",
            "--eval_batch_size",
            "8",
            "--allora_eta",
            "1.5",
            "--overwrite_output_dir",
            "true",
        ]
    )
    assert code == 0
    assert not any(out.glob("checkpoint-*")), old_checkpoint
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 4 and config["lora_dropout"] == 0
    assert json.loads((out / "allora_config.json").read_text())["eta"] == 1.5
    assert (out / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"]["arc_easy"]["n"] == 4 and 0 <= summary["accuracy_after"]["arc_easy"]["acc"] <= 1
    assert summary["allora_stats_last"]["allora/coefficient_max"] <= 1.5
    assert summary["train_loss_last"] is not None
    assert summary["allora"] == {"eta": 1.5, "coefficient": "weight", "scale": "gradient"}


def test_update_scale_is_recorded_in_allora_config_and_summary(tmp_path, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output_dir",
                str(out),
                "--model_name_or_path",
                tiny_model_dir,
                "--dataset_path",
                str(data),
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "4",
                "--lora_r",
                "2",
                "--skip_eval",
                "true",
                "--allora_scale",
                "update",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["allora"]["scale"] == "update"
    saved = json.loads((out / "allora_config.json").read_text())
    assert saved["scale"] == "update" and saved["format_version"] == 1


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


def test_train_help_lists_config_and_resume_without_value(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--config FILE.yaml" in help_text and "[PATH|true|false]" in help_text


def test_argparse_errors_print_a_short_usage(capsys):
    code, err = run(["train", "--max_steps", "abc"], capsys)
    assert_usage_error(code, err, "--max_steps", "invalid int")
    code, err = run(["train", "--no_such_option", "1"], capsys)
    assert_usage_error(code, err, "--no_such_option", "--help")


def test_importing_the_command_prints_no_bitsandbytes_line():
    """peft imports bitsandbytes, which warns about an optional CPU kernel on AVX512-BF16 machines."""
    result = subprocess.run([sys.executable, "-c", "import allora_trl.cli, peft, trl"], capture_output=True, text=True)
    assert result.returncode == 0 and "gemm_4bit" not in result.stderr, result.stderr


def test_usage_names_the_command_and_where_the_benchmarks_are(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "allora-trl train" in usage and "python -m benchmarks.compare" in usage


def test_train_without_the_job_extra_names_the_extra(monkeypatch, capsys):
    import allora_trl.cli as cli

    monkeypatch.setattr(cli, "JOB_MODULES", {"lm_eval": "lm-eval", "no_such_module_xyz": "no-such-req"})
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "no-such-req" in err and "allora-trl[job]" in err and "lm-eval" not in err.split("(")[1].split(")")[0]


def test_evaluation_restores_training_mode_when_lm_eval_fails(monkeypatch):
    import lm_eval.models.huggingface

    from allora_trl.job.evaluation import evaluate_docs

    def broken(*args, **kwargs):
        raise RuntimeError("lm-eval failed")

    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", broken)
    model = torch.nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError, match="lm-eval failed"):
        evaluate_docs(model, None, {"t": [{"query": "q", "choices": ["a", "b"], "gold": 0}]})
    assert model.training


def test_huge_eta_is_accepted_with_a_finite_coefficient_and_a_diverged_run_ends_in_one_line(
    tmp_path, capsys, tiny_model_dir, qa_dataset
):
    """eta 1e25 once gave an infinite coefficient and a NaN adapter with exit 0; now the run stops, in one line."""
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data)]
    argv += ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--lora_r", "2"]
    code, err = run([*argv, "--skip_eval", "true", "--allora_eta", "1e25"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert "allora-trl train: error: ALLoRA stopped training" in err and "allora_eta" in err
    assert not (out / "adapter_model.safetensors").exists()


# ----- values that cannot take effect, refused before loading (issue 19) --------------------------------------------


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps", "at least 1"]),
        (["--max_length", "0"], ["max_length", "at least 1"]),
        (["--max_length", "-5"], ["max_length", "at least 1"]),
        (["--max_steps", "0"], ["max_steps", "-1 to train for num_train_epochs"]),
        (["--max_steps", "-3"], ["max_steps", "got -3"]),
        (["--max_steps", "-1", "--num_train_epochs", "-1"], ["num_train_epochs", "positive max_steps"]),
        (["--max_steps", "-1", "--num_train_epochs", "0"], ["num_train_epochs"]),
        (["--weight_decay", "-0.1"], ["weight_decay", ">= 0"]),
        (["--learning_rate", "-0.0001"], ["learning_rate", ">= 0"]),
        (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size", "at least 1"]),
        (["--per_device_train_batch_size", "-2"], ["per_device_train_batch_size"]),
        (["--per_device_eval_batch_size", "0"], ["per_device_eval_batch_size"]),
        (["--eval_batch_size", "0"], ["eval_batch_size", "at least 1"]),
        (["--save_strategy", "steps", "--save_steps", "-1"], ["save_steps", "save_strategy='no'"]),
        (["--save_strategy", "steps", "--save_steps", "0"], ["save_steps"]),
        (["--lora_target_modules", "q_proj,lm_head"], ["lora_target_modules", "'lm_head'", "all-linear"]),
        (["--lora_target_modules", "embed_tokens"], ["lora_target_modules", "'embed_tokens'", "an embedding"]),
    ],
)
def test_values_that_cannot_take_effect_exit_2_before_loading(tmp_path, capsys, monkeypatch, argv, needles):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model")
    )
    code, err = run(["train", "--output_dir", str(tmp_path / "o"), "--skip_eval", "true", *argv], capsys)
    assert_usage_error(code, err, *needles)
    assert "target_modules`" not in err  # the command's option, not a field of the library
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config_name", ["ALLoRAConfig", "ALLoRADPOConfig", "ALLoRAKTOConfig", "ALLoRARewardConfig"])
@pytest.mark.parametrize(
    "values, field",
    [
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"max_length": 0}, "max_length"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": -3}, "max_steps"),
        ({"max_steps": -1, "num_train_epochs": -1}, "num_train_epochs"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"save_strategy": "steps", "save_steps": -1}, "save_steps"),
    ],
)
def test_trainer_configs_refuse_the_same_values(tmp_path, config_name, values, field):
    import allora_trl

    config_class = getattr(allora_trl, config_name)
    with pytest.raises(ValueError, match=f"`{field}`"):
        config_class(output_dir=str(tmp_path), **values)


@pytest.mark.parametrize("config_name", ["ALLoRAGRPOConfig", "ALLoRARLOOConfig"])
def test_online_trainer_configs_refuse_a_zero_completion_length(tmp_path, config_name):
    import allora_trl

    with pytest.raises(ValueError, match="`max_completion_length`"):
        getattr(allora_trl, config_name)(output_dir=str(tmp_path), max_completion_length=0)
    getattr(allora_trl, config_name)(output_dir=str(tmp_path), save_strategy="no", save_steps=-1)  # not applied


def test_embedding_targets_are_found_by_module_type_after_loading():
    from allora_trl.job.arguments import UsageError, check_no_embedding_targets

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.proj, self.head = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

    check_no_embedding_targets(["proj"], Tiny())
    with pytest.raises(UsageError, match="'tokens' \\(an embedding\\)"):
        check_no_embedding_targets(["proj", "tokens"], Tiny())
    with pytest.raises(UsageError, match="'head' \\(the output layer\\)"):
        check_no_embedding_targets(["head"], Tiny())


# ----- data quietly lost (issue 19) ---------------------------------------------------------------------------------


def tiny_run_argv(out, model_dir, data, *extra):
    return [
        "train",
        "--output_dir",
        str(out),
        "--model_name_or_path",
        model_dir,
        "--dataset_path",
        str(data),
        "--skip_eval",
        "true",
        "--per_device_train_batch_size",
        "4",
        "--lora_r",
        "2",
        "--logging_steps",
        "1",
        *extra,
    ]


def test_rows_too_long_are_counted_and_summary_records_the_rows_used(tmp_path, tiny_model_dir, qa_dataset, caplog):
    rows = qa_dataset.to_list()
    for row in rows[:24]:  # a prompt far beyond max_length: TRL keeps no completion token and drops the row
        row["prompt"] = "Question: " + "What colour is the sky? " * 20 + "\nAnswer:"
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="allora_trl"):
        assert main(tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "1", "--max_length", "32")) == 0
    assert any(
        "24 of 64 training rows dropped" in r.getMessage() and "max_length" in r.getMessage() for r in caplog.records
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 40 and summary["train_examples_dropped"] == 24


def test_every_row_too_long_exits_2_naming_max_length_and_writes_nothing(tmp_path, capsys, tiny_model_dir, qa_dataset):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    code, err = run(tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "1", "--max_length", "3"), capsys)
    assert_usage_error(code, err, "max_length 3", "all 64 training rows", "raise --max_length")
    assert not out.exists()


# ----- faults: a full disk, Ctrl-C, incomplete and foreign checkpoints (issue 19) ------------------------------------


def error_lines(err):
    """stderr's lines but for progress bars (datasets' and the trainer's: their lines hold a carriage return)."""
    return [line for line in err.split("\n") if line.strip() and "\r" not in line]


def fail_torch_save_when(monkeypatch, condition, error=None):
    """Make ``torch.save`` raise (a full disk by default) for the paths where ``condition(path)`` holds."""
    import errno
    import os

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and condition(str(f)):
            raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_while_checkpointing_removes_the_partial_checkpoint_and_keeps_the_last(
    tmp_path, capsys, monkeypatch, tiny_model_dir, qa_dataset
):
    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    fail_torch_save_when(monkeypatch, lambda path: "checkpoint-4" in path)
    argv = tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    code, err = run(argv, capsys)
    lines = error_lines(err)
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "the disk is full" in lines[0] and "checkpoint-4" in lines[0]
    assert str(out / "checkpoint-2") in lines[0] and "--resume_from_checkpoint" in lines[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "checkpoint-2" / "optimizer.pt").is_file()


def test_disk_full_at_the_final_save_leaves_no_partial_adapter(
    tmp_path, capsys, monkeypatch, tiny_model_dir, qa_dataset
):
    from allora_trl.job.checkpoints import STAGING_FOLDER

    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    # training_args.bin is written after the adapter's weights: the staged save is cut off half-way
    fail_torch_save_when(monkeypatch, lambda path: "checkpoint-" not in path)
    argv = tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    code, err = run(argv, capsys)
    lines = error_lines(err)
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "the disk is full" in lines[0] and "saving the trained adapter" in lines[0]
    assert str(out / "checkpoint-2") in lines[0]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not (out / STAGING_FOLDER).exists() and not (out / "summary.json").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.parametrize(
    "save_argv, interrupt_at, needles",
    [
        (["--save_strategy", "steps", "--save_steps", "2"], 2, ["checkpoint-2", "--resume_from_checkpoint"]),
        ([], 0, ["no checkpoint was saved yet", "nothing to resume from", "--save_strategy steps"]),
    ],
)
def test_ctrl_c_says_where_to_resume_from_and_exits_130(
    tmp_path, capsys, monkeypatch, tiny_model_dir, qa_dataset, save_argv, interrupt_at, needles
):
    import transformers

    data = tmp_path / "qa.jsonl"
    qa_dataset.to_json(str(data))
    out = tmp_path / "run"
    real_step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == interrupt_at:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    code, err = run(tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "4", *save_argv), capsys)
    lines = error_lines(err)
    assert code == 130 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("allora-trl train: interrupted")
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert not (out / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run with its checkpoint-2 (LoRA r=2 on all linear layers of the tiny model)."""
    from tests.conftest import qa_records

    root = tmp_path_factory.mktemp("finished")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in qa_records(64)))
    out = root / "run"
    argv = tiny_run_argv(out, tiny_model_dir, data, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    assert main(argv) == 0
    return out, data


def test_bare_resume_skips_an_incomplete_checkpoint(tmp_path, capsys, caplog, tiny_model_dir, finished_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    incomplete = out / "checkpoint-4"  # a save cut off before trainer_state.json: resuming from it would crash
    incomplete.mkdir()
    shutil.copy(out / "checkpoint-2" / "adapter_config.json", incomplete)
    argv = tiny_run_argv(out, tiny_model_dir, finished_run[1], "--max_steps", "3", "--resume_from_checkpoint")
    with caplog.at_level("WARNING", logger="allora_trl"):
        assert main(argv) == 0
    assert any("skipping checkpoint-4" in r.getMessage() for r in caplog.records)
    steps = [row["step"] for row in json.loads((out / "summary.json").read_text())["log_history"] if "loss" in row]
    assert steps == [1, 2, 3]  # 1 and 2 from checkpoint-2's history, then step 3


def test_bare_resume_with_only_incomplete_checkpoints_names_them(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "checkpoint-3").mkdir(parents=True)
    code, err = run(["train", "--output_dir", str(out), "--resume_from_checkpoint"], capsys)
    assert_usage_error(code, err, "resume_from_checkpoint", "no complete checkpoint", "checkpoint-3")


def other_model_dir(path, tiny_model_dir):
    """The tiny model's tokenizer on a model of another shape (3 layers, hidden size 32)."""
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 3, 32, 64
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model_dir}/{name}", path)
    return str(path)


@pytest.mark.parametrize(
    "change, needles",
    [
        ("model", ["is another model's checkpoint", "--model_name_or_path"]),
        (["--lora_r", "4"], ["lora_r 2", "lora_r 4", "--lora_r 2"]),
        (["--lora_target_modules", "q_proj,v_proj"], ["other layers", "--lora_target_modules"]),
    ],
)
def test_resuming_a_checkpoint_of_another_model_or_lora_says_so(
    tmp_path, capsys, tiny_model_dir, finished_run, change, needles
):
    checkpoint = str(finished_run[0] / "checkpoint-2")
    model_dir = other_model_dir(tmp_path / "other", tiny_model_dir) if change == "model" else tiny_model_dir
    extra = [] if change == "model" else change
    out = tmp_path / "run"
    argv = tiny_run_argv(out, model_dir, finished_run[1], "--max_steps", "3", "--resume_from_checkpoint", checkpoint)
    code, err = run([*argv, *extra], capsys)
    assert_usage_error(code, err, "resume_from_checkpoint", *needles)
    assert "size" not in err.split("error:")[1].split("(")[0]  # not an optimizer/tensor size mismatch
    assert not out.exists()


def test_resume_with_another_allora_eta_exits_2_before_loading(tmp_path, capsys):
    """A checkpoint trained with eta 2, resumed with --allora_eta 5: refused naming both values, nothing loaded."""
    from allora_trl.core.settings import ALLoRASettings, save_allora_config

    checkpoint = tmp_path / "o" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    save_allora_config(ALLoRASettings(eta=2.0), checkpoint)
    argv = ["train", "--output_dir", str(tmp_path / "o"), "--allora_eta", "5", "--resume_from_checkpoint"]
    code, err = run(argv, capsys)
    assert_usage_error(code, err, "allora_eta=2.0", "allora_eta=5.0")
