"""Path independence of an implicit layer (Anil et al., "Path Independent Equilibrium Models Can Better Exploit
Test-Time Computation", NeurIPS 2022).

A layer is path independent on an input when its solve reaches the same state from every starting point. Measured
by *asymptotic alignment* (AA): solve from the default start (``z_A``) and again from other starts (``z_B``: the
fixed point of another input of the batch, or noise) and take the cosine of the two solutions per example; the data
set's AA is the mean. The paper's observation: path-independent models keep improving when given more test-time
iterations than in training (*upward generalisation*), and per-example AA correlates with correctness.

Model-agnostic: everything here works on any implicit layer (a :class:`~implicit.ImplicitMixin`: a
``make_implicit`` result or a decorated block), whatever its state (a tensor or a tuple / list / dict of tensors
with a shared leading batch dimension), through the layer's public call ``layer(x, z0=..., return_info=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .module import ImplicitMixin
from .pytree import tree_map, tree_tensors

STARTS = ("other", "noise")


@dataclass
class Alignment:
    """Asymptotic alignment of one batch.

    Attributes:
        state: ``z_A``, the solution from the layer's default start (detached, in the state's structure).
        scores: per second start (``"other"``, ``"noise"``), the ``(B,)`` cosine of ``z_A`` and ``z_B`` over the
            whole flattened state; 1 means the same direction whatever the path.
        distances: per start, the ``(B,)`` relative distance ``‖z_A − z_B‖ / ‖z_A‖``.
        converged: ``"default"`` and per start, the ``(B,)`` mask of solves that met the layer's tolerance (AA is
            meant between converged solves; for limit cycles it compares whatever the budget reached).
        nfe: ``"default"`` and per start, the ``(B,)`` f-evaluations each sample's solve used.
    """

    state: Any
    scores: dict[str, Tensor]
    distances: dict[str, Tensor]
    converged: dict[str, Tensor]
    nfe: dict[str, Tensor] = field(default_factory=dict)

    @property
    def per_example(self) -> Tensor:
        """``(B,)`` AA per example: the mean over the second starts."""
        return torch.stack(list(self.scores.values())).mean(0)

    @property
    def score(self) -> float:
        """The batch's AA: the mean of :attr:`per_example`."""
        return float(self.per_example.mean())


@torch.no_grad()
def asymptotic_alignment(
    layer: ImplicitMixin,
    x: Any,
    *,
    starts: Sequence[str] = STARTS,
    z0: Any = None,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> Alignment:
    """Solve ``z* = f(z*, x)`` from the default start and from each of ``starts``; the cosine of the solutions.

    Args:
        layer: any implicit layer; called as it is (its mode, its options), without gradients.
        x: the injection of a batch of B inputs (tensor or pytree, as the layer takes it).
        starts: second starting points: ``"other"``, the solution ``z_A`` of another input of the batch (a random
            cyclic permutation, so never the input's own; needs B ≥ 2); ``"noise"``, ``noise_scale · N(0, 1)`` in
            every element.
        z0: the first start (default: the layer's own, ``layer.initial_state(x)``: zeros for most blocks).
        noise_scale: standard deviation of the noise start.
        generator: random source of the permutation and the noise (CPU generator; default torch's global one).
        **overrides: per-call engine options for every solve, e.g. ``max_iter=100, tol=1e-6`` so that the solves
            run to convergence.

    Returns:
        :class:`Alignment`, per example and per start.
    """
    if not isinstance(layer, ImplicitMixin):
        raise TypeError(
            f"asymptotic_alignment: expected an implicit layer (make_implicit(...)), got {type(layer).__name__}"
        )
    unknown = [s for s in starts if s not in STARTS]
    if unknown or not starts:
        raise ValueError(f"asymptotic_alignment: starts must be some of {', '.join(map(repr, STARTS))}, got {starts!r}")
    if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale) and noise_scale > 0):
        raise ValueError(f"asymptotic_alignment: noise_scale must be a positive number, got {noise_scale!r}")
    overrides.pop("return_info", None)
    _, info_a = layer(x, z0=z0, return_info=True, **overrides)
    z_a = info_a.state
    flat_a = _flat(z_a)
    batch = flat_a.shape[0]
    result = Alignment(
        state=z_a,
        scores={},
        distances={},
        converged={"default": info_a.forward.converged.clone()},
        nfe={"default": info_a.forward.nstep.clone()},
    )
    for start in starts:
        if start == "other":
            if batch < 2:
                raise ValueError("asymptotic_alignment: the 'other' start needs a batch of at least 2 inputs")
            order = torch.randperm(batch, generator=generator)
            source = torch.empty_like(order)
            source[order] = order.roll(-1)  # a single cycle: example order[i] starts from order[i + 1]'s solution
            z_b0 = _take(z_a, source)
        else:
            z_b0 = tree_map(
                lambda t: noise_scale * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device), z_a
            )
        _, info_b = layer(x, z0=z_b0, return_info=True, **overrides)
        flat_b = _flat(info_b.state)
        norm_a, norm_b = flat_a.norm(dim=1), flat_b.norm(dim=1)
        tiny = torch.finfo(flat_a.dtype).tiny
        result.scores[start] = (flat_a * flat_b).sum(1) / (norm_a * norm_b).clamp_min(tiny)
        result.distances[start] = (flat_a - flat_b).norm(dim=1) / norm_a.clamp_min(tiny)
        result.converged[start] = info_b.forward.converged.clone()
        result.nfe[start] = info_b.forward.nstep.clone()
    return result


def alignment_correlation(scores: Tensor, correct: Tensor) -> float:
    """Pearson correlation (point-biserial for a boolean ``correct``) of per-example AA ``scores`` ``(B,)`` with
    ``correct`` ``(B,)`` (bool or numbers); NaN when either is constant (no correlation is defined)."""
    if scores.shape != correct.shape or scores.dim() != 1:
        raise ValueError(
            f"alignment_correlation: scores and correct must be 1-D of equal length, got {tuple(scores.shape)} and "
            f"{tuple(correct.shape)}"
        )
    a = scores.detach().double().cpu()
    b = correct.detach().double().cpu()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def budget_table(
    evaluate: Callable[[int], Mapping[str, float]],
    training_budget: int,
    factors: Sequence[float] = (1.0, 2.0, 4.0),
) -> list[dict[str, float]]:
    """Upward generalisation: the task metrics at test-time budgets ``ceil(factor × training_budget)``.

    Args:
        evaluate: the metrics (e.g. ``{"accuracy": ..., "nfe": ...}``) of the model evaluated with a given solver
            budget (``max_iter``); the caller decides the rest (e.g. ``tol=0`` to spend every budget in full).
        training_budget: the solver budget used in training.
        factors: multiples of the training budget, one row each (1×, 2×, 4× by default).

    Returns:
        One row per factor: ``{"factor", "budget", **metrics}``.
    """
    if not (isinstance(training_budget, int) and training_budget >= 1):
        raise ValueError(f"budget_table: training_budget must be an integer ≥ 1, got {training_budget!r}")
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"budget_table: factors must be positive numbers, got {factors!r}")
    rows = []
    for factor in factors:
        budget = max(1, math.ceil(factor * training_budget))
        rows.append({"factor": float(factor), "budget": float(budget), **evaluate(budget)})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows (dicts with the same keys) as a Markdown table; floats with 4 significant digits."""
    if not rows:
        return ""
    names = list(columns) if columns is not None else list(rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row.get(n, "") for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ state trees
def _take(tree: Any, index: Tensor) -> Any:
    """Samples ``index`` of every leaf (a copy)."""
    return tree_map(lambda t: t[index.to(t.device)].clone() if isinstance(t, Tensor) else t, tree)


def _flat(tree: Any) -> Tensor:
    """The state as ``(B, N)`` float64 (every floating-point leaf flattened per sample, concatenated)."""
    leaves = [t for t in tree_tensors(tree) if t.is_floating_point()]
    if not leaves:
        raise ValueError("asymptotic_alignment: the layer's state has no floating-point tensor")
    batch = leaves[0].shape[0]
    return torch.cat([t.reshape(batch, -1).to(torch.float64) for t in leaves], dim=1)
