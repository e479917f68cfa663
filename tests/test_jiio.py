"""JIIO (implicit.jiio): the closed-form optimum of a linear DEQ with a quadratic objective, feasibility of every
evaluated input, constrained optimality against the closed-form reduced gradient, training gradients against finite
differences, per-sample stopping, input checks, and the digits demo at a tiny size."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from problems import LinBlock, TanhBlock, gen
from torch import Tensor

from implicit import make_implicit
from implicit.jiio import jiio

D = torch.float64
B, N, DX, RHO = 4, 32, 24, 0.01


def linear_problem(seed: int = 0) -> tuple[LinBlock, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """``f = z Wᵀ + x Uᵀ + b`` (‖W‖₂ = 0.7), ``L = ½‖z − y‖² + (ρ/2)‖x‖²``."""
    block = LinBlock(N, DX, s=0.7, kind="gauss", seed=seed)
    y = torch.randn(B, N, generator=gen(seed + 1), dtype=D)

    def objective(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((z - y) ** 2).sum(1) + 0.5 * RHO * (x**2).sum(1)

    return block, y, objective


def closed_form(block: LinBlock, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rows: ``A = (I − W)⁻¹U``, ``c = (I − W)⁻¹b``; ridge ``x* = (AᵀA + ρI)⁻¹Aᵀ(y − c)``, ``z* = Ax* + c``,
    ``μ* = (z* − y)(I − W)⁻¹``. Returns (x*, z*, μ*, A, c)."""
    with torch.no_grad():
        eye = torch.eye(N, dtype=D)
        a = torch.linalg.solve(eye - block.W, block.U)
        c = torch.linalg.solve(eye - block.W, block.b)
        x = torch.linalg.solve(a.T @ a + RHO * torch.eye(DX, dtype=D), a.T @ (y - c).T).T
        z = x @ a.T + c
        mu = torch.linalg.solve((eye - block.W).T, (z - y).T).T
    return x, z, mu, a, c


def rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("alpha_x", [0.3, 1.0])
def test_closed_form_optimum(alpha_x: float) -> None:
    block, y, objective = linear_problem()
    x_star, z_star, mu_star, _, _ = closed_form(block, y)
    x0 = torch.zeros(B, DX, dtype=D)
    snapshot = x0.clone()
    deq = make_implicit(block, solver="anderson")
    with torch.no_grad():
        x, z, info = jiio(
            deq, objective, x0, z0=torch.zeros(B, N, dtype=D), alpha_x=alpha_x, tol=1e-12, max_iter=400,
            solver_options={"m": 40}, check_every=1,
        )  # fmt: skip
    assert bool(info.converged.all()), info.status
    assert rel(x, x_star) < 1e-9 and rel(z, z_star) < 1e-9 and rel(info.mu, mu_star) < 1e-9
    # stationarity of the closed form and the reported per-component residuals
    assert float((RHO * x + info.mu @ block.U.detach()).abs().max()) < 1e-9
    for r in (info.residual_z, info.residual_mu, info.residual_x):
        assert r is not None and r.shape == (B,) and float(r.max()) < 1e-9
    assert info.nfe == info.vjps == info.trace_nfe[-1] + 1 and info.nfe < 300
    assert info.total_evaluations == 2 * info.nfe
    assert torch.equal(x0, snapshot)


def test_plain_iteration_diverges_where_anderson_converges() -> None:
    """At α_x = 0.3 the augmented map's spectral radius exceeds 1: the engine's plain fixed-point solver stops the
    samples as diverged (exploding residual); Anderson converged above."""
    block, _, objective = linear_problem()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="JIIO solve: 0/4 converged, 4 diverged"):
        _, _, info = jiio(
            make_implicit(block), objective, torch.zeros(B, DX, dtype=D), z0=torch.zeros(B, N, dtype=D),
            alpha_x=0.3, tol=1e-10, max_iter=1500, solver="fixed_point",
        )  # fmt: skip
    assert not bool(info.converged.any())
    assert bool(info.diverged.all()), info.status


@pytest.mark.parametrize("gradient", ["danskin", "implicit"])
def test_danskin_value_gradient(gradient: str) -> None:
    """``dV/db = Σ_b μ*_b`` for the optimal value ``V = Σ_b L(z*_b, x*_b)``."""
    block, y, objective = linear_problem()
    _, _, mu_star, _, _ = closed_form(block, y)
    deq = make_implicit(block, tol=1e-13, max_iter=200, backward_tol=1e-13, backward_max_iter=200)
    x, z, info = jiio(
        deq, objective, torch.zeros(B, DX, dtype=D), z0=torch.zeros(B, N, dtype=D), alpha_x=1.0, tol=1e-13,
        max_iter=400, solver_options={"m": 40}, check_every=1, gradient=gradient,
    )  # fmt: skip
    (grad_b,) = torch.autograd.grad(objective(z, x).sum(), block.b)
    assert rel(grad_b, mu_star.sum(0)) < 1e-9
    assert info.gradient is not None and info.gradient.backward is not None


def reduced_gradient(x: Tensor, a: Tensor, c: Tensor, y: Tensor) -> Tensor:
    """∇ of ``Q(x) = ½‖xAᵀ + c − y‖² + (ρ/2)‖x‖²`` (rows)."""
    return (x @ a.T + c - y) @ a + RHO * x


@pytest.mark.parametrize("constraint", [("box", -0.3, 0.3), ("linf", 0.2), ("l2", 0.5)])
def test_constrained_optimum_and_feasibility(constraint: tuple) -> None:
    """Every input the network and the objective see is feasible, the returned x too, and x* is a fixed point of the
    projected gradient step of the closed-form reduced objective (the constrained optimum of a convex problem)."""
    block, y, objective = linear_problem(seed=3)
    _, _, _, a, c = closed_form(block, y)
    x0 = 0.1 * torch.randn(B, DX, generator=gen(7), dtype=D)
    seen: list[Tensor] = []

    def recording(z: Tensor, x: Tensor) -> Tensor:
        seen.append(x.detach().clone())
        return objective(z, x)

    with torch.no_grad():
        x, _, info = jiio(
            make_implicit(block), recording, x0, z0=torch.zeros(B, N, dtype=D), constraint=constraint, alpha_x=0.5,
            tol=1e-12, max_iter=600, solver_options={"m": 30}, check_every=1,
        )  # fmt: skip
    assert bool(info.converged.all()), info.status
    assert len(seen) == info.nfe
    kind = constraint[0]
    for xs in [*seen, x]:
        if kind == "box":
            assert float(xs.abs().max()) <= 0.3
        elif kind == "linf":
            assert float((xs - x0).abs().max()) <= 0.2 + 1e-15
        else:
            assert float(torch.linalg.vector_norm(xs - x0, dim=1).max()) <= 0.5 * (1 + 1e-14)
    assert float(info.violation.max()) <= 1e-15
    # x* = Π(x* − t ∇Q(x*)) with t = 1/‖AᵀA + ρI‖
    t = 1.0 / float(torch.linalg.matrix_norm(a.T @ a, 2) + RHO)
    step = x - t * reduced_gradient(x, a, c, y)
    if kind == "box":
        projected = step.clamp(-0.3, 0.3)
        active = float(((x.abs() - 0.3).abs() < 1e-12).double().mean())
        assert active > 0.3  # the bound matters
    elif kind == "linf":
        projected = x0 + (step - x0).clamp(-0.2, 0.2)
    else:
        d = step - x0
        projected = x0 + d * torch.clamp(0.5 / torch.linalg.vector_norm(d, dim=1, keepdim=True), max=1.0)
        assert float(torch.linalg.vector_norm(x - x0, dim=1).min()) > 0.5 * (1 - 1e-9)  # the ball is active
    assert float((projected - x).abs().max()) < 1e-9 * t * 100


def tanh_setup(constraint: tuple | None) -> Callable[..., tuple[Tensor, ...]]:
    """A function of ``(y, b, x0)`` (target, block bias, start / ball centre) returning JIIO's ``(x*, z*)`` on a
    small tanh DEQ, for gradcheck."""
    n, d, batch = 6, 4, 2
    block = TanhBlock(n, d, s=0.6, kind="gauss", seed=5)

    def run(y: Tensor, b: Tensor, x0: Tensor, gradient: str | None = "implicit") -> tuple[Tensor, ...]:
        block.b = b  # the bias becomes a closed-over tensor (gradcheck's input)  # type: ignore[assignment]

        def objective(z: Tensor, x: Tensor) -> Tensor:
            return 0.5 * ((z - y) ** 2).sum(1) + 0.1 * (x**2).sum(1)

        x, z, _ = jiio(
            make_implicit(block), objective, x0, z0=torch.zeros(batch, n, dtype=D), constraint=constraint,
            alpha_x=0.5, tol=1e-14, max_iter=400, check_every=1, gradient=gradient,
        )  # fmt: skip
        return x, z

    del block._parameters["b"]
    return run


@pytest.mark.parametrize("constraint", [None, ("box", -0.25, 0.25), ("l2", 0.3)])
def test_training_gradient_matches_finite_differences(constraint: tuple | None) -> None:
    run = tanh_setup(constraint)
    g = gen(11)
    y = (0.8 * torch.randn(2, 6, generator=g, dtype=D)).requires_grad_()
    b = (0.1 * torch.randn(6, generator=g, dtype=D)).requires_grad_()
    x0 = (0.2 * torch.randn(2, 4, generator=g, dtype=D)).requires_grad_()
    x, _ = run(y, b, x0)
    if constraint is not None:  # the constraint is active but not everywhere: its gradient path matters
        x = x.detach()
        active = ((x.abs() - 0.25).abs() < 1e-12) if constraint[0] == "box" else None
        if active is not None:
            assert 0 < int(active.sum()) < x.numel()
        else:
            assert float(torch.linalg.vector_norm(x - x0.detach(), dim=1).min()) > 0.3 * (1 - 1e-9)
    assert torch.autograd.gradcheck(run, (y, b, x0), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_per_sample_stopping_leaves_converged_samples_unchanged() -> None:
    """A sample that converged early is frozen: it is bitwise the same whatever the budget, while the slower ones
    move; and solving it alone gives the same point. Sample 0 has a stronger regulariser (better conditioned)."""
    block, y, _ = linear_problem()
    rho = torch.tensor([1.0, RHO, RHO, RHO], dtype=D)

    def objective(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((z - y[: len(x)]) ** 2).sum(1) + 0.5 * rho[: len(x)] * (x**2).sum(1)

    x0 = torch.zeros(B, DX, dtype=D)
    deq = make_implicit(block)
    kwargs = {"z0": torch.zeros(B, N, dtype=D), "alpha_x": 0.3, "tol": 1e-6, "check_every": 1}
    with torch.no_grad():
        x_a, z_a, info_a = jiio(deq, objective, x0, max_iter=70, **kwargs)
        x_b, z_b, info_b = jiio(deq, objective, x0, max_iter=300, **kwargs)
    assert bool(info_a.converged[0]) and not bool(info_a.converged[1:].any()) and bool(info_b.converged.all())
    assert int(info_b.nstep[0]) == int(info_a.nstep[0]) < 70 < int(info_b.nstep[1:].min())
    assert torch.equal(x_a[0], x_b[0]) and torch.equal(z_a[0], z_b[0])
    assert not torch.equal(x_a[1:], x_b[1:])
    with torch.no_grad():
        x_1, _, info_1 = jiio(deq, objective, x0[:1], max_iter=70, **{**kwargs, "z0": torch.zeros(1, N, dtype=D)})
    assert int(info_1.nstep[0]) == int(info_a.nstep[0])
    assert float((x_1[0] - x_a[0]).abs().max()) < 1e-12


def test_pytree_input_float32_and_record() -> None:
    """x0 a dict of tensors, float32: dtypes follow the inputs; the result is the engine's record."""
    block = TanhBlock(8, 5, s=0.5, seed=2, dtype=torch.float32)
    target = torch.randn(3, 8, generator=gen(1)).float() * 0.5

    def objective(z: Tensor, x: dict[str, Tensor]) -> Tensor:
        return ((z - target) ** 2).sum(1) + 0.01 * (x["a"] ** 2).sum(1) + 0.01 * (x["b"] ** 2).sum((1, 2))

    class Split(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = block

        def forward(self, z: Tensor, x: dict[str, Tensor]) -> Tensor:
            return self.inner(z, torch.cat((x["a"], x["b"].flatten(1)), dim=1))

        def initial_state(self, x: dict[str, Tensor]) -> Tensor:
            return x["a"].new_zeros(x["a"].shape[0], 8)

    x0 = {"a": torch.zeros(3, 1), "b": torch.zeros(3, 2, 2)}
    with torch.no_grad():
        x, z, info = jiio(make_implicit(Split()), objective, x0, constraint=("l2", 1.0), alpha_x=0.5, tol=1e-5)
    assert set(x) == {"a", "b"} and x["b"].shape == (3, 2, 2) and x["b"].dtype == torch.float32
    assert z.dtype == torch.float32 and info.z.dtype == torch.float32
    assert bool(info.converged.all()), info.status
    assert info.residual_x is not None and float(info.residual_x.max()) < 1e-4
    assert "converged (3/3)" in repr(info)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"constraint": ("ball", 1.0)}, "unknown constraint kind 'ball'"),
        ({"constraint": ("l2", -1.0)}, "radius must be a finite number ≥ 0"),
        ({"constraint": ("linf", float("nan"))}, "radius must be a finite number ≥ 0"),
        ({"constraint": ("box", 1.0, -1.0)}, "lo > hi"),
        ({"constraint": ("box", 0.0)}, "two bounds"),
        ({"constraint": "linf"}, "constraint must be None"),
        ({"alpha_x": -0.1}, "alpha_x must be a finite number > 0"),
        ({"gradient": "exact"}, "gradient must be one of"),
        ({"solver": "gmres"}, "cannot solve the augmented JIIO map"),
        ({"max_iter": 0}, "max_iter must be an integer ≥ 1"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    block, _, objective = linear_problem()
    with pytest.raises(ValueError, match=message):
        jiio(make_implicit(block), objective, torch.zeros(B, DX, dtype=D), z0=torch.zeros(B, N, dtype=D), **kwargs)


def test_bad_objective_and_input() -> None:
    block, _, _ = linear_problem()
    deq, z0 = make_implicit(block), torch.zeros(B, N, dtype=D)
    with pytest.raises(ValueError, match=r"per-sample loss of shape \(4,\), got \(\)"):
        jiio(deq, lambda z, x: (z**2).sum(), torch.zeros(B, DX, dtype=D), z0=z0)
    bad = torch.zeros(B, DX, dtype=D)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="x0 contains non-finite values"):
        jiio(deq, lambda z, x: (z**2).sum(1), bad, z0=z0)
    with pytest.raises(TypeError, match="implicit layer"):
        jiio(block, lambda z, x: (z**2).sum(1), torch.zeros(B, DX, dtype=D))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    block, y, _ = linear_problem()
    x_star = closed_form(block, y)[0]
    cuda_block = block.cuda()
    y_cuda = y.cuda()

    def objective_cuda(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((z - y_cuda) ** 2).sum(1) + 0.5 * RHO * (x**2).sum(1)

    with torch.no_grad():
        x, _, info = jiio(
            make_implicit(cuda_block), objective_cuda, torch.zeros(B, DX, dtype=D, device="cuda"),
            z0=torch.zeros(B, N, dtype=D, device="cuda"), alpha_x=1.0, tol=1e-12, max_iter=400,
            solver_options={"m": 40},
        )  # fmt: skip
    assert x.device.type == "cuda" and rel(x.cpu(), x_star) < 1e-9, info.status


def test_demo_tiny(tmp_path) -> None:
    from integrations.jiio.commands import MATCH, main

    main(["demo", "--out", str(tmp_path), "--train-steps", "30", "--images", "4", "--max-iter", "60", "--quiet"])
    report = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 1000
    for task in ("denoise", "inpaint"):
        row = report[task]
        assert row["jiio"]["evaluations"] > 0 and row["baseline"]["evaluations"] > 0
        assert math.isfinite(row["jiio"]["objective"]) and math.isfinite(row["jiio"]["error"])
        # both improved on the start; the baseline ran until it was within 0.1 % of JIIO's decrease (or its budget)
        start, mine, theirs = row["start_objective"], row["jiio"]["objective"], row["baseline"]["objective"]
        assert mine < start and theirs < start
        target = mine + MATCH * (start - mine)
        assert theirs <= target + 1e-6 * abs(target) or row["baseline"]["capped"]
        assert row["ratio"] == row["baseline"]["evaluations"] / row["jiio"]["evaluations"]


def test_readme_example_runs_as_written() -> None:
    """The README's JIIO example (its asserts: convergence, feasibility, a converged gradient solve)."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    heading = "## Optimise a network's inputs: `implicit.jiio`"
    assert heading in text
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    (block,) = re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)
    namespace: dict = {}
    exec(compile(block, str(readme), "exec"), namespace)
    assert namespace["info"].gradient.backward is not None
