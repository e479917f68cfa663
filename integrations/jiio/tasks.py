"""The JIIO tasks on scikit-learn's digits (8×8 images, 1797 samples) and the nested-optimisation baseline.

* Inverse problems (denoising, inpainting) by latent-code optimisation: an autoencoder whose decoder is a DEQ
  (``z* = tanh(z W + x U + b)``, image ``sigmoid(z* C + d)``) is trained briefly; a corrupted image ``y`` with a mask
  ``M`` (observed pixels) is then reconstructed by ``min_x ½‖M ⊙ (image(z*(x)) − y)‖² + (λ/2)‖x‖²`` over the latent
  code x in the box the encoder's codes live in.
* Adversarial perturbations of a small DEQ classifier (``z* = tanh(z W + x U + b)``, logits ``z* C + d``):
  ``max_{‖x − x_clean‖∞ ≤ ε} CE(logits(z*(x)), label)``, i.e. ``min −CE``.

Both are solved by :func:`implicit.jiio.jiio` and by nested optimisation (:func:`run_nested`: a DEQ solve to
tolerance and an implicit backward per outer projected Adam / gradient step) until it reaches JIIO's objective value.
Cost is counted in evaluations of f plus vector-Jacobian products through f.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit import make_implicit
from implicit.jiio import Projection, jiio
from implicit.module import ImplicitMixin

Objective = Callable[[Tensor, Tensor], Tensor]


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(images (1797, 64) in [0, 1], labels (1797,))`` of scikit-learn's digits."""
    from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]

    data = sklearn_digits()
    return torch.as_tensor(data.data, dtype=dtype) / 16.0, torch.as_tensor(data.target, dtype=torch.long)


def split(n: int, seed: int, test: int = 297) -> tuple[Tensor, Tensor]:
    """A fixed random split of ``n`` indices into (train, test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[test:], perm[:test]


class TanhBlock(nn.Module):
    """``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)`` with ``‖W‖_F ≤ gamma`` (so ``‖W‖₂ ≤ gamma`` < 1: a contraction in z)."""

    def __init__(self, state: int, inputs: int, gamma: float = 0.9) -> None:
        super().__init__()
        self.state, self.gamma = state, gamma
        self.W = nn.Parameter(torch.randn(state, state) * 0.5 / math.sqrt(state))
        self.U = nn.Parameter(torch.randn(state, inputs) / math.sqrt(inputs))
        self.b = nn.Parameter(torch.zeros(state))

    def weight(self) -> Tensor:
        norm = torch.linalg.matrix_norm(self.W)
        return self.W * torch.clamp(self.gamma / norm, max=1.0)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight().T + x @ self.U.T + self.b)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.state)


DEQ_OPTIONS: dict[str, Any] = {"solver": "anderson", "tol": 1e-4, "max_iter": 40, "backward_tol": 1e-5}


class AutoEncoder(nn.Module):
    """Encoder ``64 → 64 → latent`` (codes in ``(−bound, bound)`` by a scaled tanh) and a DEQ decoder."""

    def __init__(self, latent: int = 10, state: int = 64, bound: float = 2.0) -> None:
        super().__init__()
        self.bound = bound
        self.encoder = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, latent))
        self.block = TanhBlock(state, latent)
        self.deq = make_implicit(self.block, **DEQ_OPTIONS)
        self.readout = nn.Linear(state, 64)

    def encode(self, images: Tensor) -> Tensor:
        return self.bound * torch.tanh(self.encoder(images))

    def image(self, z: Tensor) -> Tensor:
        """Pixels in (0, 1) from the decoder's equilibrium state."""
        return torch.sigmoid(self.readout(z))

    def decode(self, x: Tensor) -> Tensor:
        return self.image(self.deq(x))


class Classifier(nn.Module):
    """A DEQ classifier ``x (64 pixels) → z* → logits (10)``."""

    def __init__(self, state: int = 64) -> None:
        super().__init__()
        self.block = TanhBlock(state, 64)
        self.deq = make_implicit(self.block, **DEQ_OPTIONS)
        self.readout = nn.Linear(state, 10)

    def logits(self, z: Tensor) -> Tensor:
        return self.readout(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.deq(x))


def train(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Adam on ``loss_fn(images, labels)`` over random mini-batches; returns the loss per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        loss = loss_fn(images[idx], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step, history[-1])
    model.eval()
    return history


def autoencoder_loss(model: AutoEncoder) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(images: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(model.decode(model.encode(images)), images)

    return loss


def classifier_loss(model: Classifier) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(images: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(model(images), labels)

    return loss


# ------------------------------------------------------------------------------------------------ problems
CORRUPTIONS = ("denoise", "inpaint")


def corrupt(images: Tensor, kind: str, seed: int, noise: float = 0.3) -> tuple[Tensor, Tensor]:
    """``(y, mask)``: ``"denoise"`` adds Gaussian noise of std ``noise`` (all pixels observed); ``"inpaint"`` hides a
    random 4×4 square (the rest observed)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "denoise":
        y = images + noise * torch.randn(images.shape, generator=g).to(images.dtype)
        return y, torch.ones_like(images)
    if kind != "inpaint":
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    mask = torch.ones(len(images), 8, 8, dtype=images.dtype)
    corners = torch.randint(0, 5, (len(images), 2), generator=g)
    for i, (r, c) in enumerate(corners.tolist()):
        mask[i, r : r + 4, c : c + 4] = 0
    mask = mask.reshape(len(images), 64)
    return images * mask, mask


@dataclass
class Problem:
    """One batched input-optimisation problem: a DEQ, its objective ``(z, x) -> (B,)``, the start and the set."""

    deq: ImplicitMixin
    objective: Objective
    x0: Tensor
    constraint: tuple[Any, ...]
    projection: Projection
    alpha_x: float
    readout: Callable[[Tensor], Tensor] = field(default=lambda z: z)


def inverse_problem(model: AutoEncoder, y: Tensor, mask: Tensor, prior: float = 1e-2) -> Problem:
    """Latent-code reconstruction of ``y`` on the observed pixels ``mask``, from the code 0, in the encoder's box."""
    bound = model.bound

    def objective(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((mask * (model.image(z) - y)) ** 2).sum(1) + 0.5 * prior * (x**2).sum(1)

    x0 = y.new_zeros(len(y), model.block.U.shape[1])
    lo, hi = x0.new_full((1, x0.shape[1]), -bound), x0.new_full((1, x0.shape[1]), bound)
    return Problem(model.deq, objective, x0, ("box", -bound, bound), Projection("box", lo=lo, hi=hi), 1.0, model.image)


def adversarial_problem(
    model: Classifier, images: Tensor, labels: Tensor, epsilon: float = 0.1, norm: str = "linf"
) -> Problem:
    """The ``norm`` (``"linf"`` or ``"l2"``) ball of radius ``epsilon`` around ``images``; the objective is minus
    the cross-entropy."""

    def objective(z: Tensor, x: Tensor) -> Tensor:
        return -F.cross_entropy(model.logits(z), labels, reduction="none")

    center = images.clone()
    return Problem(model.deq, objective, center, (norm, epsilon), Projection(norm, center=center, radius=epsilon), 1.0)


# ------------------------------------------------------------------------------------------------ solvers
@dataclass
class Outcome:
    """What one optimisation did: the input and state found, the per-sample objective, cost and time."""

    x: Tensor
    z: Tensor
    objective: Tensor
    evaluations: int  # f-evaluations + vector-Jacobian products through f
    seconds: float
    steps: int
    capped: bool = False  # JIIO: not every sample converged; nested: the target was not reached
    history: list[tuple[int, float]] = field(default_factory=list)  # (evaluations, objective sum)
    converged: int | None = None  # JIIO: samples converged to tol


def run_jiio(problem: Problem, *, max_iter: int = 100, tol: float = 1e-5, memory: int = 30, **options: Any) -> Outcome:
    """JIIO on ``problem`` (no gradient attached); ``options``: more keywords of :func:`implicit.jiio.jiio`
    (``solver``, ``alpha_z``, ...)."""
    options = {"solver_options": {"m": memory}, "alpha_x": problem.alpha_x, **options}
    if options.get("solver", "anderson") != "anderson":
        options.pop("solver_options")
    start = time.perf_counter()
    with torch.no_grad():
        x, z, info = jiio(
            problem.deq, problem.objective, problem.x0, constraint=problem.constraint, max_iter=max_iter, tol=tol,
            **options,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    assert info.objective is not None
    converged = int(info.converged.sum())
    return Outcome(
        x, z, info.objective, info.total_evaluations, seconds, info.nfe, converged < len(x), converged=converged
    )


def run_nested(
    problem: Problem,
    *,
    target: float,
    method: str = "adam",
    lr: float = 0.05,
    max_steps: int = 2000,
    tol: float = 1e-5,
) -> Outcome:
    """Nested optimisation: per outer step a DEQ solve to ``tol`` (warm-started at the previous z*), the objective,
    its implicit backward (the layer's ``"implicit"`` mode) and a projected Adam (``method="adam"``) or gradient
    (``"pgd"``, step ``lr``) step on x. Stops once the objective summed over the batch is ≤ ``target`` (or after
    ``max_steps`` steps: ``capped``). Evaluations: forward f-evaluations + the tracked call + backward VJPs + the VJP
    through the tracked call, per step."""
    if method not in ("adam", "pgd"):
        raise ValueError(f"unknown method {method!r}; valid: 'adam', 'pgd'")
    x = problem.projection(problem.x0.detach().clone()).requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr) if method == "adam" else torch.optim.SGD([x], lr=lr)
    deq, z_prev = problem.deq, None
    evaluations, history = 0, []
    start = time.perf_counter()
    for step in range(max_steps + 1):
        z, info = deq(x, z_prev, tol=tol, max_iter=200, return_info=True)
        values = problem.objective(z, x)
        total = float(values.detach().sum())
        evaluations += info.forward.nfe + info.tracked_nfe
        history.append((evaluations, total))
        z_prev = z.detach()
        if total <= target or step == max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        values.sum().backward()
        evaluations += info.backward_vjps + 1
        optimizer.step()
        with torch.no_grad():
            x.copy_(problem.projection(x))
    seconds = time.perf_counter() - start
    return Outcome(x.detach(), z.detach(), values.detach(), evaluations, seconds, step, total > target, history)


def exact_objective(problem: Problem, x: Tensor, tol: float = 1e-10) -> Tensor:
    """``(B,)`` the objective at ``x`` with z*(x) solved to ``tol`` (a measurement, not counted as cost)."""
    with torch.no_grad():
        z = problem.deq(problem.projection(x), tol=tol, max_iter=500)
        return problem.objective(z, problem.projection(x))


def jiio_curve(problem: Problem, budgets: list[int], **options: Any) -> list[tuple[int, float, float]]:
    """JIIO stopped after each of ``budgets`` iterations (tol 0): ``(evaluations, exact objective sum, seconds)``;
    ``options`` as for :func:`run_jiio`."""
    rows = []
    for budget in budgets:
        outcome = run_jiio(problem, max_iter=budget, tol=0.0, **options)
        rows.append((outcome.evaluations, float(exact_objective(problem, outcome.x).sum()), outcome.seconds))
    return rows
