"""Test problems (tanh and linear layers with a known contraction) and the small helpers the test files share.

* ``tanh(s, kind, xs)``: ``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)`` with ``‖W‖₂ = s`` exactly; kind ``gauss`` (iid Gaussian
  rescaled), ``sym`` (A + Aᵀ rescaled, real spectrum) or ``orth`` (s × random orthogonal). ``U ~ N(0, 1)/√N``,
  ``b ~ 0.1·N(0, 1)``, ``x ~ xs·N(0, 1)``. Lipschitz bound in z: L = s.
* ``lin``: ``f(z, x) = z Wᵀ + x Uᵀ + b``; row form of the closed form ``z* = (x Uᵀ + b)(I − Wᵀ)⁻¹``.

Everything is seeded through explicit ``torch.Generator`` objects, float64 unless a test asks otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import implicit
from implicit.solvers import all_rules, capability_rule, forward_rule
from implicit.testing.strategies import default_backward_solvers, default_solvers

DTYPE = torch.float64
KINDS = ("gauss", "sym", "orth")
# Solver lists read from the registry, so that a registered solver is exercised by every test that uses them.
SOLVER_NAMES = default_solvers()  # usable in every role (forward, backward, unrolled, correction)
BACKWARD_SOLVER_NAMES = default_backward_solvers()  # the above and the linear solvers (GMRES)
DISCRETE_SOLVERS = implicit.SOLVERS.names(  # forward solvers that step (not the ODE integrator)
    all_rules(forward_rule, capability_rule(("records_trajectory",), "stepping"))
)
STRUCTURES = ("tensor", "tuple", "dict", "nested")

# Forward and backward options that solve to round-off.
EXACT = {
    "tol": 1e-14,
    "max_iter": 400,
    "check_every": 1,
    "backward_tol": 1e-13,
    "backward_max_iter": 400,
}


# ---------------------------------------------------------------------------------------------------- construction
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_weight(n: int, s: float, kind: str, g: torch.Generator, dtype: torch.dtype = DTYPE) -> Tensor:
    """An ``n × n`` matrix with spectral norm exactly ``s`` (up to round-off)."""
    a = torch.randn(n, n, generator=g, dtype=DTYPE)
    if kind == "gauss":
        w = a
    elif kind == "sym":
        w = a + a.T
    elif kind == "orth":
        w, _ = torch.linalg.qr(a)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return (s * w / torch.linalg.matrix_norm(w, 2)).to(dtype)


def spectral_weight(eigenvalues: Tensor, g: torch.Generator) -> Tensor:
    """Symmetric ``Q diag(λ) Qᵀ`` with a random orthogonal Q: spectrum and 2-norm are known exactly."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return q @ torch.diag(eigenvalues.to(DTYPE)) @ q.T


def injection(batch: int, d: int, xs: float, g: torch.Generator, dtype: torch.dtype = DTYPE) -> Tensor:
    return (xs * torch.randn(batch, d, generator=g, dtype=DTYPE)).to(dtype)


class _AffineBlock(nn.Module):
    """Parameters ``W (n×n)``, ``U (n×d)``, ``b (n)`` shared by the tanh and linear blocks."""

    def __init__(
        self,
        n: int,
        d: int | None = None,
        *,
        s: float = 0.9,
        kind: str = "gauss",
        seed: int = 0,
        dtype: torch.dtype = DTYPE,
        weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        d = n if d is None else d
        g = gen(seed)
        w = make_weight(n, s, kind, g) if weight is None else weight
        self.W = nn.Parameter(w.to(dtype))
        self.U = nn.Parameter((torch.randn(n, d, generator=g, dtype=DTYPE) / math.sqrt(n)).to(dtype))
        self.b = nn.Parameter((0.1 * torch.randn(n, generator=g, dtype=DTYPE)).to(dtype))

    def pre_activation(self, z: Tensor, x: Tensor) -> Tensor:
        return z @ self.W.T + x @ self.U.T + self.b


class TanhBlock(_AffineBlock):
    """``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)``, ``‖W‖₂ = s``."""

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.pre_activation(z, x))


class LinBlock(_AffineBlock):
    """``f(z, x) = z Wᵀ + x Uᵀ + b`` with the closed-form equilibrium."""

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.pre_activation(z, x)

    def closed_form(self, x: Tensor) -> Tensor:
        """``z* = (x Uᵀ + b)(I − Wᵀ)⁻¹`` (row form of ``(I − W)⁻¹(U x + b)``)."""
        with torch.no_grad():
            eye = torch.eye(self.W.shape[0], dtype=self.W.dtype)
            rhs = x @ self.U.T + self.b
            return torch.linalg.solve(eye - self.W, rhs.T).T


def tanh_f(z: Tensor, x: Tensor, W: Tensor, U: Tensor, b: Tensor) -> Tensor:
    """Functional form of :class:`TanhBlock` (parameters as plain inputs, e.g. for gradcheck)."""
    return torch.tanh(z @ W.T + x @ U.T + b)


def lin_f(z: Tensor, x: Tensor, W: Tensor, U: Tensor, b: Tensor) -> Tensor:
    return z @ W.T + x @ U.T + b


@dataclass
class Problem:
    """A block, its injection and the Lipschitz bound of ``z ↦ f(z, x)``; ``fn`` is the flat map for ``solve``."""

    block: _AffineBlock
    x: Tensor
    lipschitz: float

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.block.W.shape[0]

    @property
    def params(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.block.W, self.block.U, self.block.b)

    def fn(self, z: Tensor) -> Tensor:
        """The flat map ``(B, N) -> (B, N)`` for :func:`implicit.solve`."""
        return self.block(z, self.x)

    def frozen(self) -> Problem:
        """The same problem with parameters that do not require grad (plain forward solves)."""
        self.block.requires_grad_(False)
        return self

    def z0(self) -> Tensor:
        return torch.zeros(self.batch, self.n, dtype=self.x.dtype)

    def reference(self) -> Tensor:
        """z* to round-off by plain iteration written out here (independent of the engine's loop)."""
        steps = math.ceil(math.log(1e-18) / math.log(self.lipschitz)) + 20
        with torch.no_grad():
            z = self.z0()
            for _ in range(steps):
                z = self.fn(z)
        return z


def tanh_problem(
    s: float = 0.9,
    kind: str = "gauss",
    xs: float = 1.0,
    *,
    batch: int = 8,
    n: int = 64,
    d: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = DTYPE,
) -> Problem:
    block = TanhBlock(n, d, s=s, kind=kind, seed=seed, dtype=dtype)
    x = injection(batch, block.U.shape[1], xs, gen(seed + 10_000), dtype)
    return Problem(block, x, s)


def lin_problem(
    s: float = 0.9,
    kind: str = "gauss",
    xs: float = 1.0,
    *,
    batch: int = 4,
    n: int = 16,
    d: int | None = None,
    seed: int = 0,
    weight: Tensor | None = None,
) -> Problem:
    block = LinBlock(n, d, s=s, kind=kind, seed=seed, weight=weight)
    x = injection(batch, block.U.shape[1], xs, gen(seed + 10_000))
    return Problem(block, x, s)


def diverging_lin_problem(seed: int = 0) -> Problem:
    """``lin`` with symmetric W, eigenvalues 1.5 (real, > 1) and U[−0.5, 0.5]: ‖W‖₂ = 1.5 and plain iteration
    explodes, while the closed-form equilibrium still exists (1 is not an eigenvalue)."""
    g = gen(seed)
    eig = torch.cat([torch.tensor([1.5], dtype=DTYPE), torch.rand(15, generator=g, dtype=DTYPE) - 0.5])
    return lin_problem(batch=4, n=16, weight=spectral_weight(eig, g), seed=seed)


# ---------------------------------------------------------------------------------------------------- measurements
def residuals(fn: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``(abs, rel)`` per sample, recomputed here: ``‖f(z) − z‖/√N`` and ``‖f(z) − z‖/‖f(z)‖``."""
    with torch.no_grad():
        fz = fn(z)
        gnorm = torch.linalg.vector_norm(fz - z, dim=1)
        eps = torch.finfo(z.dtype).tiny ** 0.5
        return gnorm / math.sqrt(z.shape[1]), gnorm / (torch.linalg.vector_norm(fz, dim=1) + eps)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def grads(output: Tensor, inputs: list[Tensor] | tuple[Tensor, ...], cotangent: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(output, inputs, cotangent))


# ---------------------------------------------------------------------------------------------------- pytree states
def split_state(z: Tensor, structure: str, widths: list[int]):
    """Cut a ``(B, N)`` state into a pytree: ``tensor`` (as is), ``tuple``, ``dict`` or ``nested`` (dict holding a
    list holding a tuple). A leaf whose width is even is stored as ``(B, 2, w/2)`` to exercise multi-dim leaves.
    Keys are chosen so every pytree flattening order equals the order of ``widths``."""
    if structure == "tensor":
        return z
    parts = [p.reshape(p.shape[0], 2, -1) if p.shape[1] % 2 == 0 else p for p in z.split(widths, dim=1)]
    if structure == "tuple":
        return tuple(parts)
    if structure == "dict":
        return {f"k{i:02d}": p for i, p in enumerate(parts)}
    if structure == "nested":
        assert len(parts) >= 2, "a nested state needs at least two leaves"
        return {"a": parts[0], "b": [*parts[1:-1], (parts[-1],)]}
    raise ValueError(structure)


def merge_state(state) -> Tensor:
    leaves = pytree.tree_leaves(state)
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)


class PytreeBlock(nn.Module):
    """A flat block seen through a structured state: ``f(state, x) = split(block(merge(state), x))``."""

    def __init__(self, block: nn.Module, structure: str, widths: list[int]) -> None:
        super().__init__()
        self.block, self.structure, self.widths = block, structure, list(widths)

    def forward(self, state, x: Tensor):
        return split_state(self.block(merge_state(state), x), self.structure, self.widths)

    def initial_state(self, x: Tensor):
        n = sum(self.widths)
        return split_state(torch.zeros(x.shape[0], n, dtype=x.dtype), self.structure, self.widths)


def widths_for(n: int, pieces: int) -> list[int]:
    """``pieces`` positive widths summing to ``n`` (the last takes the remainder)."""
    pieces = max(1, min(pieces, n))
    base = n // pieces
    return [base] * (pieces - 1) + [n - base * (pieces - 1)]


# ---------------------------------------------------------------------------------------------------- adjoints
def per_sample_jacobian(fn: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """``(B, N, N)`` exact Jacobians ``J_b[i, j] = ∂fn(z)_{b,i}/∂z_{b,j}`` of a map that does not mix samples."""
    z = z.detach()
    jac = torch.autograd.functional.jacobian(lambda w: fn(w).sum(0), z, vectorize=True)  # (N, B, N)
    return jac.permute(1, 0, 2).detach()


def row_times(v: Tensor, jac: Tensor) -> Tensor:
    """Per-sample row vector times matrix: ``v_b J_b`` for ``v`` (B, N) and ``jac`` (B, N, N)."""
    return torch.bmm(v[:, None], jac)[:, 0]


def exact_adjoint(jac: Tensor, v: Tensor) -> Tensor:
    """``u* = v (I − J)⁻¹`` per sample (the implicit-differentiation adjoint), by a dense solve."""
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    return torch.linalg.solve(eye - jac, v[:, None], left=False)[:, 0]


def phantom_adjoint(jac: Tensor, v: Tensor, steps: int, tau: float) -> Tensor:
    """Closed form of the phantom adjoint ``u_k = τ v Σ_{i<k} Bⁱ``, ``B = (1 − τ) I + τ J`` (Geng et al., NeurIPS 2021),
    with explicit matrices."""
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    damped = (1 - tau) * eye + tau * jac
    term, total = v, torch.zeros_like(v)
    for _ in range(steps):
        total = total + term
        term = row_times(term, damped)
    return tau * total


def shine_adjoint(v: Tensor, estimate: implicit.LowRankInverse) -> Tensor:
    """``u_SHINE = −v H = v − (v Uᵀ) V`` from a Broyden result's factors ``H = −I + Σ u_i v_iᵀ`` (einsum, written
    independently of the engine)."""
    return v - torch.einsum("br,brn->bn", torch.einsum("bn,brn->br", v, estimate.U), estimate.V)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine similarity of two ``(B, N)`` tensors."""
    return torch.nn.functional.cosine_similarity(a.detach(), b.detach(), dim=1)


def read_adjoint(p: Problem, cotangent: Tensor, z0: Tensor | None = None, **options):
    """The adjoint row ``u`` a backward mode sends into ``f`` for the loss ``Σ c ⊙ z*``: the gradient w.r.t. a zero
    perturbation ``e`` added to the block's output, ``f(z) + e`` (``∂f/∂e = I``; the fixed point is unchanged).
    Returns ``(u, z*, info)``."""
    e = torch.zeros(p.batch, p.n, dtype=p.x.dtype, requires_grad=True)
    z, info = implicit.equilibrium(lambda z, x: p.block(z, x) + e, p.x, p.z0() if z0 is None else z0, **options)
    (u,) = torch.autograd.grad(z, e, cotangent)
    return u, z.detach(), info


def solution_grads(p: Problem, cotangent: Tensor, **options):
    """Gradients of ``Σ c ⊙ z*`` w.r.t. ``(x, W, U, b)`` through :func:`implicit.equilibrium`; returns
    ``(grads, z*, info)``."""
    x = p.x.detach().clone().requires_grad_()
    z, info = implicit.equilibrium(p.block, x, p.z0(), **options)
    return list(torch.autograd.grad((cotangent * z).sum(), [x, *p.params])), z.detach(), info


def grads_from_adjoint(p: Problem, z: Tensor, u: Tensor) -> list[Tensor]:
    """``u ∂f/∂(x, W, U, b)`` at ``z`` (one VJP through a single call of the block): the gradient a backward mode with
    adjoint ``u`` produces."""
    x = p.x.detach().clone().requires_grad_()
    return list(torch.autograd.grad(p.block(z.detach(), x), [x, *p.params], u))


class CountingTanh(TanhBlock):
    """:class:`TanhBlock` that counts its calls and the gradients flowing back through them (one per VJP)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.vjps = 0

    def _count_vjp(self, grad: Tensor) -> None:
        self.vjps += 1

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        pre = self.pre_activation(z, x)
        if pre.requires_grad:
            pre.register_hook(self._count_vjp)
        return torch.tanh(pre)


# Source of a small contractive block for tests that write projects to disk (the CLI and pytest-plugin tests):
# with ``broken=True`` its custom autograd Function flips the sign of ``linear.weight``'s gradient.
FLIPPED_BLOCK = '''
class FlipGrad(torch.autograd.Function):
    """Identity forward, negated gradient: the 'wrong sign for one parameter' mutation."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Block(nn.Module):
    def __init__(self, broken=False):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.tensor(0.8))
        with torch.no_grad():
            self.linear.weight.mul_(0.5)  # ‖W‖₂ < 1: contractive
        self.broken = broken

    def forward(self, z, x):
        weight = FlipGrad.apply(self.linear.weight) if self.broken else self.linear.weight
        return torch.tanh(self.gain * nn.functional.linear(z, weight, self.linear.bias) + x)
'''


class _MapGradient(torch.autograd.Function):
    """Identity forward; the backward hands on ``transform(gradient)`` (a block whose backward is wrong)."""

    @staticmethod
    def forward(ctx, t: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.transform = transform
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.transform(g), None


def map_gradient(t: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """``t`` unchanged, with its gradient replaced by ``transform(gradient)`` (e.g. ``torch.neg``)."""
    return _MapGradient.apply(t, transform)


HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch) -> list[str]:
    """Record every ``Tensor.__bool__ / item / tolist / __float__ / __int__ / __index__`` call (on CPU the proxy for a
    host-device synchronisation) in the returned list until ``monkeypatch.undo()``."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
