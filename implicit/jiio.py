"""Joint inference and input optimisation (JIIO) in equilibrium networks.

Gurumurthy, Bai, Manchester and Kolter, "Joint inference and input optimization in equilibrium networks", NeurIPS
2021. For a DEQ ``z* = f(z*, x)`` and a per-sample objective ``L(z, x)``, the problem ``min_{x ∈ C} L(z*(x), x)`` has
the stationarity conditions (row vectors, one row per sample; ``J = ∂f/∂z``)::

    z = f(z, x)                                  (equilibrium)
    μ = ∂L/∂z(z, x) + μ ∂f/∂z(z, x)              (the implicit adjoint: μ = ∂L/∂z (I − J)⁻¹)
    x = Π_C(x − α_x (∂L/∂x(z, x) + μ ∂f/∂x(z, x)))   (projected-gradient stationarity)

JIIO solves the three together as one fixed point of the augmented map ``T`` over ``w = (z, μ, x)`` (paper, Alg. 1)::

    T(w) = (z + α_z (f(z, x̃) − z),  μ + α_μ (∂L/∂z + μ ∂f/∂z − μ),  Π_C(x̃ − α_x (∂L/∂x + μ ∂f/∂x))),  x̃ = Π_C(x)

every right-hand side at the old ``w``. One application costs one evaluation of f and one backward pass through f and
L (which gives ``μ ∂f/∂z`` and ``μ ∂f/∂x`` together). ``x`` enters f only projected (``x̃``), so the network and the
objective are only ever evaluated at feasible inputs; fixed points are unchanged (``x* = Π_C(…)`` is feasible).

Plain iteration of ``T`` diverges at practical ``α_x`` and crawls below them (near the solution its x-block is
gradient descent on the reduced objective through a lagged inner loop); Anderson acceleration with a long memory
(20–40) over the whole augmented state is what makes it practical. The solve runs the engine's solver and shared loop
(:func:`implicit.solvers.iterate`: per-sample stopping, best iterate, divergence guards) on the flat augmented state.

Gradients for training *through* the optimised inputs: with ``gradient="implicit"`` (default) the returned ``x*`` and
``z*`` carry the exact implicit-function-theorem gradient of the augmented fixed point ``w* = T(w*; θ)`` with respect
to everything ``f`` and ``L`` use (parameters, tensors the objective closes over, ``x0`` through the ball's centre):
``dℓ/dθ = u ∂T/∂θ`` with ``u (I − ∂T/∂w) = ∂ℓ/∂w*``, solved with GMRES through second-order vector-Jacobian products
(the engine's ``"implicit"`` backward mode on ``T``). With ``gradient="danskin"`` ``x*`` is a constant and ``z*``
carries the DEQ's own gradient at fixed ``x*``: exact for the optimal value ``V(θ) = min_x L`` (Danskin's theorem,
``dV/dθ = ∂L/∂θ + μ* ∂f/∂θ``), not for other functions of ``x*``. ``gradient=None`` returns detached tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .dropout import implicit_call
from .module import ImplicitMixin, equilibrium, parametrizations_cached
from .options import ImplicitOptions, check_number
from .problem import Problem, report_divergence
from .pytree import StateLayout, all_finite, tree_tensors
from .registry import check_choice
from .result import ImplicitInfo, SolverResult
from .solvers import SOLVERS, STOP_MODES, Loop
from .solvers.base import residual
from .types import State

CONSTRAINTS = ("box", "l2", "linf")
GRADIENTS = ("implicit", "danskin")

#: Default options of the augmented solve per solver (JIIO needs a long Anderson memory; a small scale-free
#: regulariser: the default 1e-4 caps the accuracy Anderson reaches on these ill-conditioned linear modes).
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {"anderson": {"m": 30, "lam": 1e-8}}

#: The backward system ``u (I − ∂T/∂w) = v`` of ``gradient="implicit"`` is not contractive (plain iteration of T
#: diverges at practical α_x): GMRES by default. Its tolerance defaults to the solve's ``tol`` (1e-10 for tol 0).
GRADIENT_DEFAULTS: dict[str, Any] = {
    "backward_solver": "gmres",
    "backward_solver_options": {"restart": 40},
    "backward_max_iter": 400,
}

Objective = Callable[[State, Any], Tensor]


# ---------------------------------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Projection:
    """Euclidean projection onto the feasible set, acting on flat ``(B, Nx)`` inputs.

    Kinds: ``"none"``; ``"box"``: ``clamp(x, lo, hi)`` (``lo``, ``hi`` flat ``(1 or B, Nx)``); ``"linf"``:
    ``x0 + clamp(x − x0, −r, r)``; ``"l2"``: ``x0 + (x − x0) · min(1, r / ‖x − x0‖)`` per sample.
    """

    kind: str
    center: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None
    radius: float = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "box":
            assert self.lo is not None and self.hi is not None
            return torch.minimum(torch.maximum(x, self.lo), self.hi)
        if self.kind == "none":
            return x
        assert self.center is not None
        d = x - self.center
        if self.kind == "linf":
            return self.center + d.clamp(-self.radius, self.radius)
        norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        # min(1, r/‖d‖) without dividing by zero (d = 0 is feasible: factor 1)
        factor = torch.where(norm > self.radius, self.radius / norm.clamp_min(torch.finfo(d.dtype).tiny), 1.0)
        return self.center + d * factor

    def violation(self, x: Tensor) -> Tensor:
        """``(B,)`` how far each sample lies outside the set (0 when feasible; max-norm for box and L∞)."""
        if self.kind == "none":
            return x.new_zeros(x.shape[0])
        if self.kind == "box":
            assert self.lo is not None and self.hi is not None
            return torch.maximum((self.lo - x).clamp_min(0), (x - self.hi).clamp_min(0)).amax(dim=1)
        assert self.center is not None
        d = x - self.center
        if self.kind == "linf":
            return (d.abs().amax(dim=1) - self.radius).clamp_min(0)
        return (torch.linalg.vector_norm(d, dim=1) - self.radius).clamp_min(0)


def make_projection(constraint: Any, x_layout: StateLayout, x0: Tensor) -> Projection:
    """The :class:`Projection` of a ``constraint`` (see :func:`jiio`) around the flat ``x0`` (``(B, Nx)``);
    ``ValueError`` naming the problem."""
    if constraint is None:
        return Projection("none")
    if isinstance(constraint, str) or not isinstance(constraint, (tuple, list)) or not constraint:
        raise ValueError(
            f"constraint must be None, ('box', lo, hi), ('l2', radius) or ('linf', radius), got {constraint!r}"
        )
    kind, *args = constraint
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown constraint kind {kind!r}; valid kinds: {', '.join(map(repr, CONSTRAINTS))}")
    if kind == "box":
        if len(args) != 2:
            raise ValueError(f"constraint ('box', lo, hi) takes two bounds, got {len(args)} value(s)")
        lo, hi = (_bound(name, value, x_layout, x0) for name, value in zip(("lo", "hi"), args))
        if bool((lo > hi).any()):
            raise ValueError("constraint ('box', lo, hi): lo > hi for some entries (empty feasible set)")
        return Projection("box", lo=lo, hi=hi)
    if len(args) != 1:
        raise ValueError(f"constraint ({kind!r}, radius) takes one radius, got {len(args)} value(s)")
    (radius,) = args
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"constraint ({kind!r}, radius): the radius must be a finite number ≥ 0, got {radius!r}")
    return Projection(kind, center=x0, radius=float(radius))


def _bound(name: str, value: Any, x_layout: StateLayout, x0: Tensor) -> Tensor:
    """A box bound as a flat ``(1 or B, Nx)`` tensor: a number, or a tensor broadcastable to a tensor ``x0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"constraint ('box', lo, hi): {name} must be a number or a tensor, got {value!r}")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ValueError(f"constraint ('box', lo, hi): {name} is NaN")
        return x0.new_full((1, x0.shape[1]), float(value))
    if not x_layout.single:
        raise ValueError(f"constraint ('box', lo, hi): {name} must be a number when x0 is a pytree of tensors")
    if bool(value.isnan().any()):
        raise ValueError(f"constraint ('box', lo, hi): {name} contains NaN")
    shape = x_layout.shapes[0]
    try:
        full = torch.broadcast_to(value.detach().to(device=x0.device, dtype=x0.dtype), shape)
    except RuntimeError:
        raise ValueError(
            f"constraint ('box', lo, hi): {name} of shape {tuple(value.shape)} does not broadcast to x0's shape "
            f"{tuple(shape)}"
        ) from None
    return full.reshape(x0.shape)


# ---------------------------------------------------------------------------------------------------- result
@dataclass(repr=False)
class JIIOResult(SolverResult):
    """The engine's :class:`~implicit.SolverResult` of the augmented solve (over the flat ``w = (z, μ, x)``, its
    residual ``T(w) − w`` in ``stop_mode``; ``converged``, ``nstep``, ``trace``, ``status`` per sample) with what
    JIIO adds. ``z`` (inherited) is the flat ``(B, 2Nz + Nx)`` augmented point returned.

    Attributes:
        residual_z, residual_mu, residual_x: ``(B,)`` per-component residuals at the returned point, in
            ``stop_mode``: ``f(z, x) − z``; ``∂L/∂z + μJ − μ``; ``Π_C(x − α_x ∇_x) − x`` (the projected-gradient step,
            0 exactly at a constrained stationary point). ``"rel"`` divides by the norm of the new value (``f``,
            ``∂L/∂z + μJ``, ``Π_C(…)``; + eps), ``"abs"`` by the root of the component's size.
        objective: ``(B,)`` the objective ``L(z, x)`` at the returned point.
        mu: the adjoint μ (detached), in the state's structure.
        violation: ``(B,)`` constraint violation of the returned x (0 up to round-off).
        vjps: backward passes through f and L spent (one per augmented evaluation).
        total_evaluations: ``nfe + vjps``, f-evaluations and vector-Jacobian products together (for comparisons with
            nested optimisation); ``nfe`` counts the augmented evaluations, i.e. f-evaluations (solve + the final
            measurement of the returned point).
        gradient: the training-gradient record (``"implicit"``: an :class:`~implicit.ImplicitInfo` of the augmented
            map, whose ``backward`` is filled once autograd runs; ``"danskin"``: the DEQ's info at fixed ``x*``);
            ``None`` when no gradient is attached.
    """

    residual_z: Tensor | None = None
    residual_mu: Tensor | None = None
    residual_x: Tensor | None = None
    objective: Tensor | None = None
    mu: Any = None
    violation: Tensor | None = None
    vjps: int = 0
    gradient: ImplicitInfo | None = None

    @property
    def total_evaluations(self) -> int:
        return self.nfe + self.vjps

    def __repr__(self) -> str:
        return f"JIIOResult({self.status}; nfe={self.nfe}, vjps={self.vjps}, tol {self.tol:g})"


# ---------------------------------------------------------------------------------------------------- the map
class AugmentedMap:
    """The augmented JIIO map ``T`` on flat ``w = (z, μ, x)`` rows (see the module docstring).

    Called with grad mode off (the solve) it is graph-free; called with grad mode on (the tracked call of the
    training gradient) it records a graph through its own first-order derivatives (``create_graph``), so that the
    engine's implicit backward mode can take vector-Jacobian products of ``T``.
    """

    def __init__(
        self,
        f: Callable[[State, Any], State],
        objective: Objective,
        z_layout: StateLayout,
        x_layout: StateLayout,
        projection: Projection,
        alphas: tuple[float, float, float],
    ) -> None:
        self.f, self.objective = f, objective
        self.z_layout, self.x_layout, self.projection = z_layout, x_layout, projection
        self.nz, self.nx = z_layout.numel, x_layout.numel
        self.alpha_z, self.alpha_mu, self.alpha_x = alphas

    def split(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, mu, x = w.split((self.nz, self.nz, self.nx), dim=1)
        return z, mu, x

    def parts(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(z, μ, x̃, f(z, x̃), ∂L/∂z + μJ, ∂L/∂x + μ∂f/∂x, L)`` at ``w`` (``x̃ = Π_C(x)``)."""
        z, mu, x = self.split(w)
        x = self.projection(x)
        graph = torch.is_grad_enabled()
        with torch.enable_grad():
            zl = z if graph and z.requires_grad else z.detach().requires_grad_()
            xl = x if graph and x.requires_grad else x.detach().requires_grad_()
            z_tree, x_tree = self.z_layout.unflatten(zl), self.x_layout.unflatten(xl)
            fz = self.z_layout.flatten(self.f(z_tree, x_tree), what="the block's output")
            loss = self.objective(z_tree, x_tree)
            batch = w.shape[0]
            if not isinstance(loss, Tensor) or loss.shape != (batch,):
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"objective(z, x) must return a per-sample loss of shape ({batch},), got {got}")
            total = loss.sum() + torch.linalg.vecdot(fz, mu.to(fz.dtype)).sum()
            gz, gx = torch.autograd.grad(total, (zl, xl), create_graph=graph, allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz
        gx = torch.zeros_like(x) if gx is None else gx
        if not graph:
            fz, loss = fz.detach(), loss.detach()
        return z, mu, x, fz, gz, gx, loss

    def __call__(self, w: Tensor) -> Tensor:
        z, mu, x, fz, gz, gx, _ = self.parts(w)
        z_new = z + self.alpha_z * (fz - z)
        mu_new = mu + self.alpha_mu * (gz - mu)
        x_new = self.projection(x - self.alpha_x * gx)
        return torch.cat((z_new, mu_new, x_new), dim=1)


# ---------------------------------------------------------------------------------------------------- entry point
def jiio(
    deq: ImplicitMixin,
    objective: Objective,
    x0: Any,
    *,
    constraint: tuple[Any, ...] | None = None,
    max_iter: int = 100,
    tol: float = 1e-5,
    alpha_z: float = 0.8,
    alpha_mu: float = 0.6,
    alpha_x: float = 0.1,
    z0: State | None = None,
    solver: str | None = None,
    solver_options: Mapping[str, Any] | None = None,
    stop_mode: str = "rel",
    check_every: int = 4,
    gradient: str | None = "implicit",
    gradient_options: Mapping[str, Any] | None = None,
) -> tuple[Any, State, JIIOResult]:
    """Solve ``min_{x ∈ C} objective(z*(x), x)`` with ``z* = f(z*, x)`` by JIIO; return ``(x*, z*, info)``.

    Args:
        deq: an implicit layer (``make_implicit(block, ...)``); its block ``f(z, x)`` and :meth:`initial_state` are
            used, its solver's name too unless ``solver`` is given (not its solver options, see ``solver_options``).
        objective: ``objective(z, x) -> (B,)`` per-sample loss, differentiable in ``z`` and ``x`` (``z`` and ``x`` in
            the state's and the input's structure).
        x0: the starting input, a tensor or pytree of floating-point tensors with a leading batch dimension B (never
            modified). Also the centre of the L2 / L∞ balls.
        constraint: ``None``; ``("box", lo, hi)`` (numbers, or tensors broadcastable to a tensor ``x0``);
            ``("l2", radius)`` or ``("linf", radius)`` around ``x0`` (per sample, over all of a sample's entries).
        max_iter, tol, stop_mode, check_every: the augmented solve's loop (:class:`~implicit.solvers.Loop`); the
            residual is that of the whole augmented map, ``T(w) − w``.
        alpha_z, alpha_mu, alpha_x: step sizes of the three blocks (paper defaults 0.8, 0.6; α_x is per task:
            published 0.01–0.6). With Anderson, α_x up to ~1 is fine on well-scaled problems.
        z0: initial state (default ``deq.initial_state(x0)``); μ starts at 0.
        solver, solver_options: the solver of the augmented fixed point (default: the layer's solver) and its options
            (default for Anderson: ``m=30, lam=1e-8``; given options update the defaults).
        gradient: ``"implicit"`` (default), ``"danskin"`` or ``None``; see the module docstring. Gradients are
            attached only under grad mode; run under ``torch.no_grad()`` when none is needed.
        gradient_options: :class:`~implicit.ImplicitOptions` of the gradient (``backward_solver``,
            ``backward_tol``, ``backward_max_iter``, ...). Defaults for ``"implicit"``: :data:`GRADIENT_DEFAULTS` and
            ``backward_tol=tol``; for ``"danskin"``: the layer's options.

    Returns:
        ``x*`` in the structure of ``x0`` (feasible), ``z*`` in the state's structure, and a :class:`JIIOResult`.
    """
    if not isinstance(deq, ImplicitMixin):
        raise TypeError(f"jiio expects an implicit layer (make_implicit(block)), got {type(deq).__name__}")
    if not callable(objective):
        raise TypeError(f"objective must be callable as objective(z, x) -> (B,), got {type(objective).__name__}")
    for name, value in (("alpha_z", alpha_z), ("alpha_mu", alpha_mu), ("alpha_x", alpha_x)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if gradient not in (*GRADIENTS, None):
        raise ValueError(f"gradient must be one of {', '.join(map(repr, GRADIENTS))} or None, got {gradient!r}")
    x_tensors = tree_tensors(x0)
    if not x_tensors:
        raise ValueError("x0 has no tensors: expected a tensor or a pytree of tensors with a leading batch dimension")
    if not all_finite(x_tensors):
        raise ValueError("x0 contains non-finite values (NaN or Inf)")
    x_layout = StateLayout(x0)
    x_flat = x_layout.flatten(x0).detach()
    if z0 is None:
        z0 = deq.initial_state(x0)
    z_layout = StateLayout(z0)
    if z_layout.batch != x_layout.batch:
        raise ValueError(f"z0 has batch size {z_layout.batch} but x0 has {x_layout.batch}")
    if z_layout.device != x_layout.device:
        raise ValueError(f"z0 is on {z_layout.device} but x0 on {x_layout.device}")
    dtype = torch.promote_types(z_layout.dtype, x_layout.dtype)
    x_flat = x_flat.to(dtype)
    projection = make_projection(constraint, x_layout, x_flat)
    if projection.center is not None and x_layout.single and isinstance(x0, Tensor) and x0.requires_grad:
        # the ball's centre carries x0's gradient (the training gradient through the constraint)
        projection = dataclasses.replace(projection, center=x0.reshape(x_flat.shape).to(dtype))

    name = deq.implicit_options.solver if solver is None else solver
    cls = SOLVERS.lookup(name, option="solver")
    if cls.linear_only or cls.forward_only:
        raise ValueError(f"solver {name!r} cannot solve the augmented JIIO map (it needs a general forward solver)")
    options = {**SOLVER_DEFAULTS.get(name, {}), **dict(solver_options or {})}
    cls.check_options(options, context="solver_options")
    loop = Loop(tol=tol, max_iter=max_iter, stop_mode=stop_mode, check_every=check_every)
    _check_loop(loop)

    alphas = (float(alpha_z), float(alpha_mu), float(alpha_x))
    T = AugmentedMap(deq.block_forward, objective, z_layout, x_layout, projection, alphas)
    z_start = z_layout.flatten(z0).detach().to(dtype)
    w0 = torch.cat((z_start, torch.zeros_like(z_start), projection(x_flat.detach())), dim=1)

    with parametrizations_cached(deq), implicit_call():
        with torch.no_grad():
            result = cls(**options).run(T, w0, loop)
            report_divergence(result, "JIIO", deq.implicit_options.on_divergence)
            z, mu, x = T.split(result.z)
            w = torch.cat((z, mu, projection(x)), dim=1)  # Anderson may leave the set: return a feasible x
            # Measure the returned point: per-component residuals and the objective (one more evaluation).
            z, mu, x, fz, gz, gx, loss = T.parts(w)
            x_next = projection(x - T.alpha_x * gx)
        info = JIIOResult(
            **{field.name: getattr(result, field.name) for field in dataclasses.fields(SolverResult)},
            residual_z=residual(fz, z, stop_mode),
            residual_mu=residual(gz, mu, stop_mode),
            residual_x=residual(x_next, x, stop_mode),
            objective=loss,
            mu=z_layout.unflatten(mu),
            violation=projection.violation(x),
        )
        info.z = w
        info.nfe = result.nfe + 1
        info.vjps = result.nfe + 1

        if gradient is None or not torch.is_grad_enabled():
            return x_layout.unflatten(x), z_layout.unflatten(z), info
        if gradient == "danskin":
            return _danskin(deq, x_layout, z_layout, x, z, info, gradient_options)
        return _implicit(T, w, x_layout, z_layout, result, info, deq, gradient_options)


def _check_loop(loop: Loop) -> None:
    check_number("max_iter", loop.max_iter, minimum=1, integer=True)
    check_number("tol", loop.tol, minimum=0.0)
    check_choice("option stop_mode", loop.stop_mode, STOP_MODES)
    check_number("check_every", loop.check_every, minimum=1, integer=True)


def _implicit(
    T: AugmentedMap,
    w: Tensor,
    x_layout: StateLayout,
    z_layout: StateLayout,
    result: SolverResult,
    info: JIIOResult,
    deq: ImplicitMixin,
    gradient_options: Mapping[str, Any] | None,
) -> tuple[Any, State, JIIOResult]:
    """``x*`` and ``z*`` carrying the implicit gradient of the augmented fixed point (the engine's ``"implicit"``
    backward mode applied to ``T``; its tracked call ``T(w*)`` differentiates ``T``'s own derivatives)."""
    settings = {
        **GRADIENT_DEFAULTS,
        "backward_tol": result.tol if result.tol > 0 else 1e-10,
        "on_divergence": deq.implicit_options.on_divergence,
        **dict(gradient_options or {}),
        "backward": "implicit",
    }
    options = ImplicitOptions(**settings)
    layout = StateLayout(w)
    problem = Problem(fn=T, z0=w, options=options, layout=layout)
    record = ImplicitInfo(forward=result, backward_mode="implicit", layout=layout)
    out = options.backward_mode.attach(problem, result, record, z=w)
    info.gradient = record
    info.nfe += record.tracked_nfe
    info.vjps += record.tracked_nfe
    z, _, x = T.split(out)
    return x_layout.unflatten(x), z_layout.unflatten(z), info


def _danskin(
    deq: ImplicitMixin,
    x_layout: StateLayout,
    z_layout: StateLayout,
    x: Tensor,
    z: Tensor,
    info: JIIOResult,
    gradient_options: Mapping[str, Any] | None,
) -> tuple[Any, State, JIIOResult]:
    """``x*`` constant and ``z*`` re-attached by the layer's own solve at fixed ``x*``, warm-started at ``z*`` (its
    gradient: the layer's backward mode)."""
    options = deq.implicit_options.replace(**dict(gradient_options or {}))
    x_tree = x_layout.unflatten(x)
    z_tree, record = equilibrium(deq.block_forward, x_tree, z_layout.unflatten(z), options)
    info.gradient = record
    info.nfe += record.forward.nfe + record.tracked_nfe
    return x_tree, z_tree, info


__all__ = ["CONSTRAINTS", "GRADIENTS", "JIIOResult", "Projection", "jiio"]
