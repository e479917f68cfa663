"""Equilibrium as the steady state of an ODE, integrated with torchdiffeq (Chen et al., "Neural Ordinary Differential
Equations", NeurIPS 2018), the continuous-time view of a DEQ (Pal, Edelman and Rackauckas, "Mixing Implicit and
Explicit Deep Learning with Skip DEQs and Infinite Time Neural ODEs", arXiv:2201.12240)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ..result import SolverResult
from ..types import FlatMap
from .base import Loop, Solver

METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "rk4")


class _Stop(Exception):
    """Raised inside the right-hand side to end the integration (all samples stopped, or the budget is spent)."""


class ODE(Solver):
    """Integrate ``dz/dt = f(z) − z`` from ``z0`` until every sample's residual is ≤ tol.

    An equilibrium is a stable steady state iff every eigenvalue λ of ``J = ∂f/∂z`` has ``Re λ < 1`` — no condition on
    ``|λ|`` — so this finds equilibria of blocks that are not contractive, where plain iteration diverges. Each
    right-hand-side evaluation measures the residual of the point it was evaluated at; the result is every sample's
    best such point, and the integration is aborted once all samples are within tol (checked every ``check_every``
    evaluations). ``max_iter`` bounds the f-evaluations. It is the robust fallback, not the fast path: measured cost
    is 5–20× the f-evaluations of the discrete solvers on contractive problems (benchmarks/RESULTS.md, section a).

    Args:
        method: a torchdiffeq method (adaptive ones recommended).
        rtol, atol: integrator tolerances; default ``rtol = tol / 10`` (a looser integrator leaves samples above tol)
            and ``atol = rtol / 100``.
        t_max: integration horizon.
        step_size: step of fixed-grid methods (``euler``, ``midpoint``, ``rk4``); damped iteration with τ = h is
            explicit Euler with step h.
    """

    name = "ode"
    records_trajectory = False
    capturable = False

    def __init__(
        self,
        *,
        method: str = "dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        t_max: float = 1e4,
        step_size: float = 0.5,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"ode: method must be one of {', '.join(METHODS)}, got {method!r}")
        for label, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"ode: {label} must be a number > 0, got {value!r}")
        if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 0):
            raise ValueError(f"ode: t_max must be a finite number > 0, got {t_max!r}")
        if not (isinstance(step_size, (int, float)) and step_size > 0):
            raise ValueError(f"ode: step_size must be a number > 0, got {step_size!r}")
        self.method, self.rtol, self.atol, self.t_max, self.step_size = method, rtol, atol, t_max, step_size

    def run(self, fn: FlatMap, z0: Tensor, loop: Loop) -> SolverResult:
        from torchdiffeq import odeint  # imported by the one solver that uses it

        settings = loop
        tol, max_iter, check_every, differentiable = (
            settings.tol,
            settings.max_iter,
            settings.check_every,
            settings.differentiable,
        )
        if settings.state:
            raise ValueError(f"solver 'ode' takes no warm-start state, got {sorted(settings.state)}")
        monitor = settings.monitor(z0)
        rtol = self.rtol if self.rtol is not None else max(tol, 1e-12) / 10
        atol = self.atol if self.atol is not None else rtol / 100
        nfe = 0

        def rhs(t: Tensor, z: Tensor) -> Tensor:
            nonlocal nfe
            if nfe >= max_iter + 1:
                raise _Stop
            fz = fn(z)
            nfe += 1
            monitor.observe(z, fz, nfe)
            if nfe % check_every == 0 and not monitor.any_active():
                raise _Stop
            # A non-finite f(z) has just marked its sample diverged; a NaN in the derivative would reach the step-size
            # control (shared by the batch) and abort the integration with a dt underflow. Finite rows are unchanged.
            return torch.nan_to_num(fz - z, nan=0.0, posinf=0.0, neginf=0.0)

        options = {"step_size": self.step_size} if self.method in ("euler", "midpoint", "rk4") else None
        times = torch.tensor([0.0, self.t_max], dtype=z0.dtype, device=z0.device)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), contextlib.suppress(_Stop):
            odeint(rhs, z0, times, rtol=rtol, atol=atol, method=self.method, options=options)
        return monitor.result(nfe)
