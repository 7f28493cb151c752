"""Every ALLoRA setting is documented wherever users look for it, so a new field cannot be left out again.

The settings are read from the one place that defines them, ``ALLoRAConfig``'s ``allora_*`` dataclass fields
(``allora_scale`` was once missing from the README, docs/usage.md, the command's usage text and the example config).
"""

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from allora_trl.cli import USAGE, main
from allora_trl.trainers.sft import ALLoRAConfig

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = sorted(f.name for f in fields(ALLoRAConfig) if f.name.startswith("allora_"))


def test_the_settings_are_found():
    assert {"allora_eta", "allora_coefficient", "allora_scale"} <= set(SETTINGS)


@pytest.mark.parametrize("document", ["README.md", "docs/usage.md"])
def test_docs_name_every_setting(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    assert [s for s in SETTINGS if f"`{s}`" not in text] == []


def test_example_config_sets_every_setting():
    config = yaml.safe_load((ROOT / "example_configs" / "smollm2-arc_easy.yaml").read_text(encoding="utf-8"))
    assert [s for s in SETTINGS if s not in config] == []


def test_command_help_and_usage_list_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert [s for s in SETTINGS if f"--{s}" not in help_text] == []
    assert [s for s in SETTINGS if s not in USAGE] == []
