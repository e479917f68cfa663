"""Path-independence analysis (Anil et al., NeurIPS 2022): asymptotic alignment on a contractive map (1 exactly) and
on the bistable map tanh(2z + x) (1 − x_c = 0.46716 for the other-input start), its correlation with correctness,
and the upward-generalisation budget table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import implicit
from implicit.analysis import (
    Alignment,
    alignment_correlation,
    asymptotic_alignment,
    budget_table,
    format_table,
)

DTYPE = torch.float64
# |x| below which tanh(2z + x) has two attractors: at the saddle-node f' = 2(1 − tanh²) = 1, so z = tanh(2z + x) = s
# with s = √(1 − 1/2), and x_c = 2s − atanh(s) = 0.53284.
X_C = 2 * math.sqrt(0.5) - math.atanh(math.sqrt(0.5))


class Contractive(nn.Module):
    """f(z, x) = 0.5 tanh(W z) + x with ‖W‖₂ ≤ 1: Lipschitz 0.5, one fixed point per input."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(n, n, dtype=DTYPE)
        self.weight = nn.Parameter(w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(z @ self.weight.T) + x


class PairContractive(nn.Module):
    """The same map on a tuple state ``(a, b)`` of different shapes."""

    def forward(self, z: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = z
        return 0.5 * torch.tanh(b.mean(1, keepdim=True)) + x, 0.3 * torch.sin(a).expand(-1, 3) + 1.0

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.zeros(x.shape[0], 3, dtype=x.dtype)


class Bistable(nn.Module):
    """f(z, x) = tanh(2z + x): two attractors when |x| < x_c = 0.53284."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * z + x)


def test_contractive_map_is_path_independent():
    layer = implicit.make_implicit(Contractive(), solver="anderson", tol=1e-12, max_iter=200)
    x = torch.randn(16, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    result = asymptotic_alignment(layer, x, noise_scale=10.0, generator=torch.Generator().manual_seed(2))
    assert isinstance(result, Alignment) and set(result.scores) == {"other", "noise"}
    for start in ("other", "noise"):
        assert result.scores[start].shape == (16,)
        torch.testing.assert_close(result.scores[start], torch.ones(16, dtype=DTYPE), atol=1e-12, rtol=0)
        assert float(result.distances[start].max()) < 1e-9
        assert bool(result.converged[start].all())
    assert bool(result.converged["default"].all()) and result.nfe["default"].shape == (16,)
    assert abs(result.score - 1.0) < 1e-12


def test_pytree_state_is_path_independent():
    layer = implicit.make_implicit(PairContractive(), solver="fixed_point", tol=1e-12, max_iter=300)
    x = torch.randn(5, 1, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    result = asymptotic_alignment(layer, x, generator=torch.Generator().manual_seed(4))
    assert isinstance(result.state, tuple) and result.state[1].shape == (5, 3)
    torch.testing.assert_close(result.per_example, torch.ones(5, dtype=DTYPE), atol=1e-12, rtol=0)


def test_bistable_map_is_path_dependent():
    """From 0 the solve reaches the attractor with the sign of x; from another input's fixed point it stays on that
    side when |x| < x_c. Per example AA is then ±1, −1 exactly when |x| < x_c and the signs differ: AA = 1 − x_c."""
    n = 4000
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 1, generator=gen, dtype=DTYPE) * 2 - 1).clamp(-1, 1)
    layer = implicit.make_implicit(Bistable(), solver="fixed_point", tol=1e-10, max_iter=3000, on_divergence="ignore")
    result = asymptotic_alignment(layer, x, generator=torch.Generator().manual_seed(5))
    other = result.scores["other"]
    assert float((other.abs() - 1).abs().max()) < 1e-6  # scalar states: the cosine is a sign
    away = x[:, 0].abs() > X_C + 0.02  # one attractor: path independent whatever the start
    assert bool((other[away] > 0.999999).all())
    assert abs(float(other.mean()) - (1 - X_C)) < 0.05  # 0.46716 expected; sampling std ≈ 0.014
    z_a = result.state[:, 0]
    assert bool((torch.sign(z_a) == torch.sign(x[:, 0])).all())  # from 0: the attractor with the sign of x
    assert result.score < 0.75 and float(result.scores["noise"].mean()) < 0.8


def test_correlation_with_correctness():
    scores = torch.tensor([1.0, 0.99, 0.5, 0.4], dtype=DTYPE)
    correct = torch.tensor([True, True, False, False])
    expected = 0.545 / math.sqrt(0.302075)  # Σ(a − ā)(b − b̄) / (‖a − ā‖ ‖b − b̄‖) by hand: 0.99161
    assert alignment_correlation(scores, correct) == pytest.approx(expected, rel=1e-12)
    assert alignment_correlation(scores, ~correct) == pytest.approx(-expected, rel=1e-12)
    assert math.isnan(alignment_correlation(scores, torch.ones(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="equal length"):
        alignment_correlation(scores, correct[:3])


def test_budget_table_has_one_row_per_budget():
    layer = implicit.make_implicit(Contractive(), solver="fixed_point", tol=0.0, max_iter=4).eval()
    x = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    seen: list[int] = []

    def evaluate(budget: int) -> dict[str, float]:
        seen.append(budget)
        _, info = layer(x, max_iter=budget, return_info=True)
        return {"residual": float(info.forward.rel.mean()), "nfe": float(info.forward.nstep.float().mean())}

    rows = budget_table(evaluate, 4, (1, 2, 4))
    assert seen == [4, 8, 16] and len(rows) == 3
    assert [r["budget"] for r in rows] == [4.0, 8.0, 16.0] and [r["factor"] for r in rows] == [1.0, 2.0, 4.0]
    assert rows[0]["residual"] > rows[1]["residual"] > rows[2]["residual"]  # more budget, smaller residual
    assert [r["nfe"] for r in rows] == [5.0, 9.0, 17.0]
    table = format_table(rows, ["factor", "budget", "residual"])
    assert table.count("\n") == 4 and table.startswith("| factor | budget | residual |")
    assert len(budget_table(evaluate, 18, (1.5,))) == 1 and seen[-1] == 27
    with pytest.raises(ValueError, match="training_budget"):
        budget_table(evaluate, 0)
    with pytest.raises(ValueError, match="factors"):
        budget_table(evaluate, 4, (1, -2))


def test_bad_arguments():
    layer = implicit.make_implicit(Contractive(), tol=1e-8)
    x = torch.randn(3, 6, dtype=DTYPE)
    with pytest.raises(TypeError, match="implicit layer"):
        asymptotic_alignment(Contractive(), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="starts"):
        asymptotic_alignment(layer, x, starts=("previous",))
    with pytest.raises(ValueError, match="at least 2"):
        asymptotic_alignment(layer, x[:1], starts=("other",))
    with pytest.raises(ValueError, match="noise_scale"):
        asymptotic_alignment(layer, x, noise_scale=0.0)
    assert asymptotic_alignment(layer, x[:1], starts=("noise",)).scores["noise"].shape == (1,)
