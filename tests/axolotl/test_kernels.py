"""ALLoRA's versions of Axolotl's fused LoRA kernels (integrations/axolotl/kernels.py), block by block on CPU.

Each kernel is checked against the path it replaces: peft's LoRA layers carrying the ALLoRA variant (outputs,
the gradients of every A and B, the input gradient), on a 32-bit and a 4-bit (bitsandbytes) base, and against the
rule written out by hand (dB of plain LoRA scaled per output row by c, dA from ``(G * c) B``). The MLP kernel runs
with the torch SwiGLU / GeGLU that stand in off CUDA for Axolotl's Triton ones. Then: the switch-over after
Axolotl's own ``apply_lora_kernel_patches``, the refusals, and the config rules for the ``lora_*_kernel`` switches.
"""

import types

import pytest

# a submodule, not plain "axolotl": under pytest this folder (tests/axolotl, no __init__.py) is itself
# importable as a namespace package "axolotl" when the real one is not installed
pytest.importorskip("axolotl.integrations.base", reason="needs Axolotl 0.19 in its own venv: run .ci/axolotl.sh")
pytestmark = pytest.mark.axolotl

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from axolotl.kernels import lora as axolotl_lora  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from allora_trl import apply_allora  # noqa: E402
from allora_trl.core.gradient import weight_coefficient  # noqa: E402
from allora_trl.core.stats import collect_allora_stats, set_allora_stats_recording  # noqa: E402
from allora_trl.integrations.axolotl import args as allora_args  # noqa: E402
from allora_trl.integrations.axolotl import kernels  # noqa: E402

ETA = 2.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def allora_model(model_dir, four_bit=False, eta=ETA, coefficient="weight"):
    """The tiny Llama with LoRA (r=4, scaling 1) on every linear layer, ALLoRA installed, and B drawn at random so
    that the coefficients differ from row to row (at B = 0 every c_i is eta and dA is zero)."""
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        if four_bit
        else None
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    apply_allora(model, eta=eta, coefficient=coefficient)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def decoder_layer(model, index=0):
    return model.base_model.model.model.layers[index]


def run_block(model, fn, seed=1):
    """Outputs, input gradient and LoRA gradients of ``fn(X)`` under a fixed weighted-sum loss."""
    for p in model.parameters():
        p.grad = None
    X = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    outputs = fn(X)
    weights = torch.Generator().manual_seed(seed + 1)
    loss = sum((o.float() * torch.randn(o.shape, generator=weights)).sum() for o in outputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outputs], X.grad.detach().clone(), grads


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_same(kernel, peft_path, tol):
    (out_k, dx_k, g_k), (out_p, dx_p, g_p) = kernel, peft_path
    assert len(out_k) == len(out_p)
    for a, b in zip(out_k, out_p):
        assert a.dtype == b.dtype and rel(a, b) <= tol
    assert rel(dx_k, dx_p) <= tol
    assert set(g_k) == set(g_p) and g_p
    worst = max(rel(g_k[n], g_p[n]) for n in g_p)
    assert worst <= tol, worst


def attention_paths(layer):
    attn = layer.self_attn
    return (
        lambda X: (*kernels.allora_apply_qkv(attn, X), kernels.allora_apply_o(attn, X)),
        lambda X: (attn.q_proj(X), attn.k_proj(X), attn.v_proj(X), attn.o_proj(X)),
    )


def mlp_paths(layer, name="swiglu"):
    mlp = layer.mlp
    fn = kernels.allora_apply_mlp_swiglu if name == "swiglu" else kernels.allora_apply_mlp_geglu
    act = F.silu if name == "swiglu" else F.gelu
    return (
        lambda X: (fn(mlp, X),),
        lambda X: (mlp.down_proj(act(mlp.gate_proj(X)) * mlp.up_proj(X)),),
    )


@pytest.mark.parametrize("four_bit", [False, True], ids=["32bit-base", "4bit-base"])
def test_qkv_and_o_kernels_equal_the_peft_path(tiny_model_dir, four_bit):
    model = allora_model(tiny_model_dir, four_bit=four_bit)
    kernel, peft_path = attention_paths(decoder_layer(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert_same(run_block(model, kernel), run_block(model, peft_path), tol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("four_bit", [False, True], ids=["32bit-base", "4bit-base"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_mlp_kernel_equals_the_peft_path_with_torch_activation(tiny_model_dir, four_bit, activation):
    """gate/up/down with the torch SwiGLU (GeGLU) standing in for Axolotl's Triton one: gradients of A, B and X."""
    model = allora_model(tiny_model_dir, four_bit=four_bit)
    kernel, peft_path = mlp_paths(decoder_layer(model), activation)
    assert_same(run_block(model, kernel), run_block(model, peft_path), tol=1e-5)


def test_kernels_under_bf16_autocast_follow_the_peft_path(tiny_model_dir):
    """Under autocast both paths compute in bf16 (the coefficient cache's dtype): equal up to bf16 rounding."""
    model = allora_model(tiny_model_dir)
    layer = decoder_layer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kernel, peft_path in (attention_paths(layer), mlp_paths(layer)):
            assert_same(run_block(model, kernel), run_block(model, peft_path), tol=3e-2)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_torch_activations_match_autograd(activation):
    """The stand-ins return what Axolotl's Triton backward returns: (h, d gate, d up)."""
    forward = getattr(kernels, f"torch_{activation}_forward")
    backward = getattr(kernels, f"torch_{activation}_backward")
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(1, 5, 8, generator=gen) for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()
    h = forward(gate, up)
    h.backward(grad)
    h2, d_gate, d_up = backward(grad, gate.detach(), up.detach())
    torch.testing.assert_close(h2, h.detach())
    torch.testing.assert_close(d_gate, gate.grad)
    torch.testing.assert_close(d_up, up.grad)


def test_the_rule_by_hand_on_o_proj(tiny_model_dir):
    """dB is plain LoRA's dB with row i scaled by c_i, dA is formed from (G * c) B; the input gradient is LoRA's."""
    model = allora_model(tiny_model_dir)
    attn = decoder_layer(model).self_attn
    proj = attn.o_proj
    A, B = proj.lora_A["default"].weight, proj.lora_B["default"].weight
    W = proj.get_base_layer().weight
    X = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    G = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    kernels.allora_apply_o(attn, X).backward(G)
    c = weight_coefficient(A, B, ETA)[:, None]
    x2, g2 = X.detach().reshape(-1, 64), G.reshape(-1, 64)
    torch.testing.assert_close(B.grad, c * (g2.T @ (x2 @ A.detach().T)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(A.grad, ((g2 * c.T) @ B.detach()).T @ x2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(X.grad.reshape(-1, 64), g2 @ W + (g2 @ B.detach()) @ A.detach(), rtol=1e-5, atol=1e-6)
    assert 0.5 < c.min() < c.max() < ETA  # the rows really have different coefficients


def test_statistics_are_recorded_as_by_the_peft_path(tiny_model_dir):
    model = allora_model(tiny_model_dir)
    layer = decoder_layer(model)
    X = torch.randn(2, 4, 64)
    set_allora_stats_recording(model, True)
    recorded = []
    for fn in (
        lambda: (kernels.allora_apply_qkv(layer.self_attn, X), layer.mlp(X)),
        lambda: (layer.self_attn.q_proj(X), layer.self_attn.k_proj(X), layer.self_attn.v_proj(X), layer.mlp(X)),
    ):
        for _, module in model.named_modules():
            for variant in getattr(module, "lora_variant", {}).values():
                variant.stats.values = {}
        fn()  # with grad: under no_grad no backward runs, and neither path records
        recorded.append(collect_allora_stats(model))
    set_allora_stats_recording(model, False)
    assert recorded[0] and recorded[0].keys() == recorded[1].keys()
    for key in recorded[1]:
        assert recorded[0][key] == pytest.approx(recorded[1][key], rel=1e-6)


def test_disabled_adapter_runs_axolotls_base_only_path(tiny_model_dir):
    """No active ALLoRA adapter (here: adapters disabled, as for a DPO reference pass): Axolotl's own function."""
    model = allora_model(tiny_model_dir)
    layer = decoder_layer(model)
    X = torch.randn(2, 3, 64)
    with model.disable_adapter(), torch.no_grad():
        q, k, v = kernels.allora_apply_qkv(layer.self_attn, X)
        o = kernels.allora_apply_o(layer.self_attn, X)
        torch.testing.assert_close(q, layer.self_attn.q_proj.get_base_layer()(X))
        torch.testing.assert_close(o, layer.self_attn.o_proj.get_base_layer()(X))
        torch.testing.assert_close(v, layer.self_attn.v_proj(X))


def test_output_coefficient_is_refused_in_the_kernels(tiny_model_dir):
    model = allora_model(tiny_model_dir, coefficient="output")
    with pytest.raises(RuntimeError, match="allora_coefficient: weight"):
        kernels.allora_apply_o(decoder_layer(model).self_attn, torch.randn(1, 2, 64))


def _axolotl_patch(model, **flags):
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches

    return apply_lora_kernel_patches(model, DictDefault({"lora_qkv_kernel": True, "lora_o_kernel": True, **flags}))


def test_install_rebinds_axolotls_kernels_to_allora(tiny_model_dir):
    model = allora_model(tiny_model_dir)
    _axolotl_patch(model, lora_mlp_kernel=True)
    layer = decoder_layer(model)
    assert layer.self_attn.apply_qkv.__func__ is axolotl_lora.apply_lora_qkv  # what Axolotl patched in
    assert kernels.install_allora_kernels(model) == {"qkv": 2, "o": 2, "mlp": 2}
    for layer in model.base_model.model.model.layers:
        assert layer.self_attn.apply_qkv.__func__ is kernels.allora_apply_qkv
        assert layer.self_attn.apply_o.__func__ is kernels.allora_apply_o
        assert layer.mlp.forward.__func__ is kernels.allora_apply_mlp_swiglu
        assert layer.mlp.forward.__self__ is layer.mlp
    assert kernels.install_allora_kernels(model) == {"qkv": 0, "o": 0, "mlp": 0}  # idempotent


def test_install_leaves_plain_lora_to_axolotl(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    _axolotl_patch(model)
    assert kernels.install_allora_kernels(model) == {"qkv": 0, "o": 0, "mlp": 0}
    assert decoder_layer(model).self_attn.apply_qkv.__func__ is axolotl_lora.apply_lora_qkv


def test_kernel_without_allora_version_is_refused(tiny_model_dir):
    """An ALLoRA block routed through a kernel with no ALLoRA version (Axolotl's linear-attention projections) must
    stop the run: Axolotl's kernel would train it as plain LoRA."""
    from axolotl.monkeypatch.lora_kernels import _make_apply_lora_linear

    model = allora_model(tiny_model_dir)
    attn = decoder_layer(model).self_attn
    attn.apply_out_proj = types.MethodType(_make_apply_lora_linear("o_proj"), attn)
    with pytest.raises(RuntimeError, match="lora_o_kernel: false"):
        kernels.install_allora_kernels(model)


def test_other_axolotl_versions_are_refused(monkeypatch):
    kernels.check_axolotl_version()  # the installed 0.19
    monkeypatch.setattr(allora_args, "_axolotl_version", lambda: "0.20.1")
    with pytest.raises(RuntimeError, match=r"Axolotl 0\.20\.1.*`lora_qkv_kernel: false`"):
        kernels.check_axolotl_version(["lora_qkv_kernel"])


# ----- the config rules ----------------------------------------------------------------------------------------


def test_kernels_accepted_with_axolotl_019(load_axolotl_cfg):
    cfg = load_axolotl_cfg(lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=True)
    assert cfg.lora_qkv_kernel and cfg.lora_o_kernel and cfg.lora_mlp_kernel and cfg.adapter == "allora"
    assert cfg.lora_embedding_kernel is False


@pytest.mark.parametrize(
    "overrides, fix",
    [
        ({"allora_coefficient": "output"}, "allora_coefficient: weight"),
        ({"load_in_8bit": True}, "`lora_qkv_kernel: false`"),
        (
            {"rl": "dpo", "datasets": [{"path": "unused.jsonl", "ds_type": "json", "type": "chatml.default"}]},
            "`lora_qkv_kernel: false`",
        ),
    ],
    ids=["output-coefficient", "8bit", "rl"],
)
def test_kernel_combinations_refused_with_the_fix(load_axolotl_cfg, overrides, fix):
    with pytest.raises(ValidationError) as info:
        load_axolotl_cfg(lora_qkv_kernel=True, **overrides)
    assert "`lora_qkv_kernel`" in str(info.value) and fix in str(info.value)


def test_other_axolotl_version_refused_at_validation(monkeypatch):
    monkeypatch.setattr(allora_args, "_axolotl_version", lambda: "0.21.0")
    with pytest.raises(ValueError, match=r"Axolotl 0\.21\.0.*`lora_o_kernel: false`"):
        allora_args.check_allora_config({"adapter": "allora", "lora_r": 8, "lora_o_kernel": True})


GPU = {"capabilities": {"n_gpu": 1, "compute_capability": "sm_90", "bf16": True}}
GPU["env_capabilities"] = {"torch_version": "2.13.0"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, True),
        ({"load_in_4bit": True}, True),
        ({"allora_coefficient": "output"}, False),
        ({"load_in_8bit": True}, False),
        ({"trust_remote_code": True}, False),
        ({"lora_qkv_kernel": False}, False),  # one switch set by the user: the others are not switched on
        ({"capabilities": {"n_gpu": 1, "compute_capability": None}}, False),  # no GPU
    ],
    ids=["gpu", "4bit", "output", "8bit", "remote-code", "user-set", "cpu"],
)
def test_kernels_switched_on_where_axolotl_would_for_lora(extra, expected):
    data = allora_args.check_allora_config({"adapter": "allora", "lora_r": 8, **GPU, **extra})
    assert [data[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")] == [expected] * 3
    assert data["lora_embedding_kernel"] is False


def test_no_backward_runs_axolotls_kernel(tiny_model_dir, monkeypatch):
    """Evaluation / generation (no_grad): plain LoRA at scaling 1 through Axolotl's kernel, no cache, no statistics."""
    model = allora_model(tiny_model_dir)
    attn = decoder_layer(model).self_attn
    X = torch.randn(2, 3, 64)
    set_allora_stats_recording(model, True)
    monkeypatch.setattr(kernels, "backward_factors_of", None)  # would fail if called
    with torch.no_grad():
        torch.testing.assert_close(kernels.allora_apply_o(attn, X), attn.o_proj(X))
    assert collect_allora_stats(model) == {}


def test_gpu_benchmark_dry_run_and_arguments(tmp_path):
    """benchmarks/axolotl_kernels_gpu.py (run on a GPU, not here): its arguments and its CPU dry path, in a
    subprocess (it rewrites Axolotl's attention class for the whole process, as Axolotl does)."""
    import json
    import subprocess
    import sys

    from axolotl_helpers import REPO

    from benchmarks.axolotl_kernels_gpu import parse_args

    args = parse_args(["--preset", "smollm2-135m", "--batch", "16", "--seq", "256", "--four-bit"])
    assert (args.preset, args.batch, args.seq, args.four_bit, args.rounds) == ("smollm2-135m", 16, 256, True, 5)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "benchmarks.axolotl_kernels_gpu", "--dry-run", "--no-kernel-baselines"]
    run = subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert set(result["step_ms_median"]) == {"lora_kernels", "allora_kernels"}
    assert result["kernels_swapped"] == {"qkv": 2, "o": 2, "mlp": 0}  # Axolotl's MLP kernel needs CUDA
    assert result["allora_over_lora_kernels_median"] > 0
