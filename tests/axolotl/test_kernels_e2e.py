"""End to end: ``axolotl train`` with ``adapter: allora`` and Axolotl's fused LoRA kernels on, against the same run
with them off (CPU; a 32-bit and a 4-bit base).

Axolotl patches its attention class and binds its kernels (``lora_qkv_kernel``, ``lora_o_kernel``, and
``lora_mlp_kernel``, whose Triton SwiGLU the ALLoRA kernel replaces by a torch one off CUDA); the plugin swaps in
ALLoRA's versions. Axolotl seeds nothing before it creates a LoRA adapter, so two runs of a fresh adapter start
from different random A: both runs here continue one saved adapter (``lora_model_dir``, B already non-zero so the
coefficients differ between rows), and after a few steps the two adapters must agree to 1e-4.
"""

import json

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

import torch  # noqa: E402
from axolotl_helpers import (  # noqa: E402
    PLUGIN,
    PROBE_PLUGIN,
    allora_log_history,
    assert_plain_lora_adapter,
    base_config,
    run_axolotl_train,
)
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

STEPS = 3
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter at scaling 1 (r = alpha = 8) on every linear layer, with B drawn at random."""
    path = tmp_path_factory.mktemp("start-adapter")
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )  # task_type: Axolotl's kernels need a PeftModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(path)
    return path


def train(tiny_model_dir, tmp_path, start_adapter, **overrides):
    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        plugins=[PLUGIN, PROBE_PLUGIN],
        lora_model_dir=str(start_adapter),
        micro_batch_size=2,
        max_steps=STEPS,
        save_steps=STEPS,
        logging_steps=1,
        learning_rate=0.01,
        seed=7,
        **overrides,
    )
    return cfg, run_axolotl_train(cfg, tmp_path), tmp_path / "out"


@pytest.fixture(scope="module", params=[False, True], ids=["32bit-base", "4bit-base"])
def runs(request, tiny_model_dir, start_adapter, tmp_path_factory):
    four_bit = {"load_in_4bit": True} if request.param else {}
    off = train(tiny_model_dir, tmp_path_factory.mktemp("kernels-off"), start_adapter, **four_bit)
    on = train(tiny_model_dir, tmp_path_factory.mktemp("kernels-on"), start_adapter, **KERNELS, **four_bit)
    return request.param, off, on


def relative_differences(a: dict, b: dict) -> dict:
    return {k: ((a[k].float() - b[k].float()).norm() / b[k].float().norm()).item() for k in b}


def test_axolotl_patched_and_allora_kernels_ran(runs):
    four_bit, (_, off_log, _), (_, on_log, on_out) = runs
    assert "Patched attention class with LoRA optims: LlamaAttention" in on_log
    assert "2 attention QKV, 2 attention O, 2 MLP blocks" in on_log
    assert "ALLoRA kernels" not in off_log and "Patched attention class" not in off_log
    probe = json.loads((on_out / "probe.json").read_text())
    assert probe["adapters"]["default"] == {"lora_layers": 14, "allora_layers": 14, "trainable": 14}
    expected = "bitsandbytes.nn.modules.Linear4bit" if four_bit else "torch.nn.modules.linear.Linear"
    assert probe["base_layer_types"] == [expected]


def test_adapter_equals_the_one_trained_without_kernels(runs, start_adapter):
    _, (_, _, off_out), (_, _, on_out) = runs
    off = load_file(str(off_out / "adapter_model.safetensors"))
    on = load_file(str(on_out / "adapter_model.safetensors"))
    start = load_file(str(start_adapter / "adapter_model.safetensors"))
    assert on.keys() == off.keys() and len(off) == 28
    differences = relative_differences(on, off)
    assert max(differences.values()) <= TOLERANCE, max(differences.items(), key=lambda kv: kv[1])
    moved = relative_differences(off, start)
    assert min(moved.values()) > 100 * TOLERANCE  # every tensor trained well beyond the tolerance


def test_statistics_config_and_card_as_without_kernels(runs):
    _, (off_cfg, _, off_out), (on_cfg, _, on_out) = runs
    off_stats = allora_log_history(off_out / f"checkpoint-{STEPS}")
    on_stats = allora_log_history(on_out / f"checkpoint-{STEPS}")
    assert [h["step"] for h in on_stats] == [h["step"] for h in off_stats] == list(range(1, STEPS + 1))
    for on, off in zip(on_stats, off_stats):
        for key in ("loss", "allora/coefficient_min", "allora/coefficient_mean", "allora/coefficient_max"):
            assert on[key] == pytest.approx(off[key], rel=TOLERANCE), key
        assert on["allora/coefficient_min"] < on["allora/coefficient_max"] < 2.0  # B != 0: rows differ
    for out, cfg in ((on_out, on_cfg), (off_out, off_cfg)):
        for folder in (out, out / f"checkpoint-{STEPS}"):
            saved = assert_plain_lora_adapter(folder, cfg["lora_r"])  # and allora_config.json beside it
            assert (saved["eta"], saved["coefficient"]) == (2.0, "weight")
        assert (out / "README.md").is_file()  # the model card Axolotl writes
