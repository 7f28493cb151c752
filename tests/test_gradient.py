"""The ALLoRA gradient rule against a direct dense reference written from the paper's formula."""

import pytest
import torch

from allora_trl.core.gradient import (
    CoefficientStats,
    allora_lora_forward,
    lora_row_norms,
    weight_coefficient,
)
from allora_trl.core.settings import validate_eta


def reference_grads(x, A, B, G, eta, coefficient):
    """Dense reference: form BA, take the un-squared row norm, scale G, then the textbook formulas."""
    BA = B @ A  # n_out x n_in, materialised on purpose
    X = x.reshape(-1, x.shape[-1])
    G2 = G.reshape(-1, G.shape[-1])
    if coefficient == "weight":
        c = 1.0 / torch.sqrt(torch.linalg.vector_norm(BA, dim=1) + 1.0 / eta**2)
        Gs = G2 * c[None, :]
    else:
        out = X @ BA.T
        c = 1.0 / torch.sqrt(out.abs() + 1.0 / eta**2)
        Gs = G2 * c
    grad_B = Gs.T @ (X @ A.T)
    grad_A = (Gs @ B).T @ X
    grad_x = (G2 @ B @ A).reshape(x.shape)
    return grad_x, grad_A, grad_B


SHAPES = [(3, 5, 7, 2, 11), (2, 9, 16, 4, 8), (1, 4, 33, 8, 64)]  # batch, seq, n_in, r, n_out


@pytest.mark.parametrize("coefficient", ["weight", "output"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta", [2.0, 0.7, 5.0])
def test_gradients_equal_dense_reference(shape, eta, coefficient):
    torch.manual_seed(sum(shape))
    batch, seq, n_in, r, n_out = shape
    x = torch.randn(batch, seq, n_in, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, n_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(n_out, r, dtype=torch.float64, requires_grad=True)
    G = torch.randn(batch, seq, n_out, dtype=torch.float64)

    out = allora_lora_forward(x, A, B, eta=eta, coefficient=coefficient)
    torch.testing.assert_close(out, x @ (B @ A).T)  # forward is vanilla LoRA at scaling 1
    out.backward(G)

    ref_x, ref_A, ref_B = reference_grads(x.detach(), A.detach(), B.detach(), G, eta, coefficient)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A.grad, ref_A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B.grad, ref_B, rtol=1e-10, atol=1e-10)


def test_input_gradient_is_not_scaled_but_weight_gradients_are():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    allora_lora_forward(x, A, B, eta=2.0).sum().backward()
    (x2 @ A2.T @ B2.T).sum().backward()  # vanilla LoRA branch
    torch.testing.assert_close(x.grad, x2.grad)
    assert not torch.allclose(A.grad, A2.grad)
    assert not torch.allclose(B.grad, B2.grad)


def test_only_needed_gradients_are_computed():
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64)  # first layer: no input gradient wanted
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64)  # frozen B
    G = torch.randn(4, 5, dtype=torch.float64)
    allora_lora_forward(x, A, B).backward(G)
    _, ref_A, _ = reference_grads(x, A.detach(), B, G, 2.0, "weight")
    torch.testing.assert_close(A.grad, ref_A)


@pytest.mark.parametrize("eta", [2.0, 0.5, 3.0])
def test_coefficient_is_eta_where_B_is_zero(eta):
    A = torch.randn(4, 10)
    B = torch.zeros(7, 4)
    B[3] = 1.0  # one non-zero row, the others must still give exactly eta
    c = weight_coefficient(A, B, eta)
    expected = torch.full((7,), eta)
    mask = torch.ones(7, dtype=torch.bool)
    mask[3] = False
    torch.testing.assert_close(c[mask], expected[mask], rtol=0, atol=1e-6)
    assert c[3] < eta


def test_row_norms_match_dense_norm_without_forming_BA():
    torch.manual_seed(2)
    A = torch.randn(8, 300, dtype=torch.float64)
    B = torch.randn(50, 8, dtype=torch.float64)
    torch.testing.assert_close(
        lora_row_norms(A, B).double(), torch.linalg.vector_norm(B @ A, dim=1), rtol=1e-5, atol=1e-6
    )


def test_at_B_zero_the_rule_is_eta_times_the_vanilla_gradient():
    """The paper: at B = 0 the effective learning rate of A and B is eta times the base rate."""
    torch.manual_seed(3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(5, 2, dtype=torch.float64, requires_grad=True)  # B = 0: c == eta exactly, a constant
    eta = 2.0
    # With B = 0 and c = eta the rule equals the true gradient of eta * (B A x) for A and B and of (B A x) for x.
    out = allora_lora_forward(x, A, B, eta=eta)
    G = torch.randn_like(out)
    out.backward(G)
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    (x2 @ A2.T @ B2.T).backward(G * eta)
    torch.testing.assert_close(B.grad, B2.grad)
    torch.testing.assert_close(A.grad, A2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coefficient", ["weight", "output"])
def test_low_precision_stays_finite(dtype, coefficient):
    torch.manual_seed(4)
    x = torch.randn(2, 8, 64).to(dtype).requires_grad_()
    A = (torch.randn(8, 64) * 10).to(dtype).requires_grad_()  # squared row norms of BA (~5e6) overflow float16
    B = (torch.randn(32, 8) * 10).to(dtype).requires_grad_()
    out = allora_lora_forward(x, A, B, eta=2.0, coefficient=coefficient)
    out.float().mean().backward()
    assert A.grad.dtype == dtype and B.grad.dtype == dtype
    for t in (A.grad, B.grad, x.grad):
        assert torch.isfinite(t.float()).all()
    # the coefficient itself is computed in float32 and finite even where bf16 squares would overflow
    c = weight_coefficient(A, B, 2.0)
    assert c.dtype == torch.float32 and torch.isfinite(c).all() and (c > 0).all()


def test_autocast_bf16_gives_weight_dtype_gradients():
    torch.manual_seed(5)
    x = torch.randn(4, 16)
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = allora_lora_forward(x, A, B)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    _, ref_A, ref_B = reference_grads(x, A.detach(), B.detach(), torch.ones(4, 8), 2.0, "weight")
    torch.testing.assert_close(A.grad, ref_A, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(B.grad, ref_B, rtol=5e-2, atol=5e-2)


def test_stats_are_recorded_only_when_enabled():
    torch.manual_seed(6)
    x = torch.randn(4, 6)
    A = torch.randn(3, 6, requires_grad=True)
    B = torch.randn(5, 3, requires_grad=True)
    stats = CoefficientStats()
    allora_lora_forward(x, A, B, 2.0, "weight", stats).sum().backward()
    assert stats.values == {}
    stats.enabled = True
    allora_lora_forward(x, A, B, 2.0, "weight", stats).sum().backward()
    c = weight_coefficient(A, B, 2.0)
    assert stats.values["coefficient_min"].item() == pytest.approx(c.min().item())
    assert stats.values["coefficient_max"].item() == pytest.approx(c.max().item())
    assert (stats.values["coefficient_sum"] / stats.values["coefficient_count"]).item() == pytest.approx(
        c.mean().item()
    )
    norms = torch.linalg.vector_norm(B.detach() @ A.detach(), dim=1)
    assert (stats.values["row_norm_sum"] / stats.values["row_norm_count"]).item() == pytest.approx(
        norms.mean().item(), rel=1e-5
    )


@pytest.mark.parametrize("eta", [1e25, 1e30, 3e38, 1e-20, 1e-30, 2e-38])
@pytest.mark.parametrize("coefficient", ["weight", "output"])
def test_extreme_eta_gives_finite_coefficients_and_gradients(eta, coefficient):
    """1/eta^2 underflows (eta 1e25) or overflows (eta 1e-30) in float32; the coefficient must not."""
    torch.manual_seed(7)
    x = torch.randn(3, 6)
    A = torch.randn(4, 6, requires_grad=True)
    B = torch.zeros(5, 4)
    B[0] = 0.5  # rows 1..4 are zero: c == eta there; row 0 is not: c ~ 1/sqrt(||(BA)_0||) (or eta, if smaller)
    B.requires_grad_()
    c = weight_coefficient(A, B, eta)
    norms = lora_row_norms(A, B)
    assert torch.isfinite(c).all() and (c > 0).all()
    torch.testing.assert_close(c[1:], torch.full((4,), eta), rtol=1e-6, atol=0)
    expected_row0 = min(eta, float(1.0 / (norms[0].double() + 1.0 / eta**2).sqrt()))
    assert c[0].item() == pytest.approx(expected_row0, rel=1e-5)
    out = allora_lora_forward(x, A, B, eta=eta, coefficient=coefficient)
    (out * 1e-30).sum().backward()  # a small upstream gradient, so that eta * G itself stays in float32's range
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


@pytest.mark.parametrize("eta", [True, False, 1e39, 1e-39, "2.0x"])
def test_eta_outside_float32_or_not_a_number_is_rejected(eta):
    with pytest.raises(ValueError, match="my_eta"):
        validate_eta(eta, "my_eta")


def test_fp16_coefficient_is_capped_at_the_dtype_maximum():
    x = torch.randn(2, 4).half()
    A = torch.randn(2, 4).half().requires_grad_()
    B = torch.zeros(3, 2).half().requires_grad_()  # c == eta == 1e6 > fp16's 65504
    (allora_lora_forward(x, A, B, eta=1e6) * 1e-3).float().sum().backward()
    assert torch.isfinite(B.grad.float()).all()
