"""End to end: Axolotl's preference training (``rl: dpo``, ``rl: kto``, ``rl: simpo``) with ``adapter: allora`` on CPU.

For these modes Axolotl hands TRL's trainer only a LoRA config; TRL builds the peft model and the plugin installs
ALLoRA after trainer creation. The reference model is the base with the adapter switched off. The probe plugin
records, during the first step, which adapters carry the rule: the trained one, and nothing else.
"""

import json

import pytest
import yaml

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

from axolotl_helpers import (  # noqa: E402
    DPO_CONFIG,
    PREFERENCE_DATA,
    PROBE_PLUGIN,
    allora_log_history,
    assert_plain_lora_adapter,
    run_axolotl_train,
)

STEPS = 3


def test_preference_dataset_is_well_formed():
    rows = [json.loads(line) for line in PREFERENCE_DATA.read_text().splitlines()]
    assert 16 <= len(rows) <= 32
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in rows)


def _kto_rows(tmp_path):
    """KTO's unpaired format from the shipped pairs: each chosen answer labelled true, each rejected one false."""
    path = tmp_path / "kto.jsonl"
    with path.open("w") as f:
        for line in PREFERENCE_DATA.read_text().splitlines():
            row = json.loads(line)
            for completion, label in ((row["chosen"], True), (row["rejected"], False)):
                f.write(json.dumps({"prompt": row["prompt"], "completion": completion, "label": label}) + "\n")
    return path


@pytest.mark.parametrize("rl, trainer", [("dpo", "DPOTrainer"), ("kto", "KTOTrainer"), ("simpo", "CPOTrainer")])
def test_preference_training_with_allora(rl, trainer, tiny_model_dir, tmp_path):
    cfg = yaml.safe_load(DPO_CONFIG.read_text())
    assert cfg["rl"] == "dpo" and cfg["adapter"] == "allora"
    cfg.update(
        base_model=tiny_model_dir,
        plugins=cfg["plugins"] + [PROBE_PLUGIN],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=128,  # the tiny test tokenizer spells ChatML markers out byte by byte
        max_steps=STEPS,
        save_steps=STEPS,
        logging_steps=1,
    )
    cfg["datasets"][0]["path"] = str(PREFERENCE_DATA)
    if rl == "simpo":  # TRL's CPO trainer with the SimPO loss, on the same pairs as DPO
        cfg.update(rl="simpo", simpo_gamma=0.5)  # Axolotl passes no default: TRL divides None by beta
    if rl == "kto":
        cfg.update(rl="kto", remove_unused_columns=False)
        cfg["datasets"][0].update(path=str(_kto_rows(tmp_path)), type="chatml.prompt_pairs")
    run_axolotl_train(cfg, tmp_path)
    out = tmp_path / "out"

    probe = json.loads((out / "probe.json").read_text())
    assert trainer in probe["trainer_mro"]
    assert probe["ref_model"] is None  # the reference is the base with the adapter disabled
    active = probe["active_adapter"]
    assert probe["adapters"][active] == {"lora_layers": 14, "allora_layers": 14, "trainable": 14}
    for name, entry in probe["adapters"].items():  # a frozen reference copy, if TRL made one, has no rule
        if name != active:
            assert entry["allora_layers"] == 0 and entry["trainable"] == 0

    stats = allora_log_history(out / f"checkpoint-{STEPS}")
    assert [h["step"] for h in stats] == list(range(1, STEPS + 1))
    eta = cfg["allora_eta"]
    assert stats[0]["allora/coefficient_mean"] == pytest.approx(eta, rel=1e-4)
    assert stats[-1]["allora/coefficient_mean"] < eta

    for folder in (out, out / f"checkpoint-{STEPS}"):
        settings = assert_plain_lora_adapter(folder, cfg["lora_r"])
        assert (settings["eta"], settings["coefficient"]) == (eta, cfg["allora_coefficient"])
