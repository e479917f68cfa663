"""Weight normalisation for DEQ blocks through ``torch.nn.utils.parametrizations`` (weight norm: Salimans and Kingma,
NeurIPS 2016; spectral norm: Miyato et al., ICLR 2018; both used for DEQs by Bai et al., NeurIPS 2019).

Inside an implicit layer every parametrised weight is evaluated once per call and shared by all f-evaluations
(see :func:`implicit.module.parametrizations_cached`): no manual reset step, ``deepcopy`` and ``state_dict`` work as
for any parametrised module, and buffers live on the weight's device and dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _torch_spectral_norm
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """``w = g · v / ‖v‖`` (per output channel for ``dim=0``), as ``torch.nn.utils.parametrizations.weight_norm``."""
    return _torch_weight_norm(module, name=name, dim=dim)


class SpectralBound(nn.Module):
    """Parametrisation ``W ↦ W · min(1, bound / σ(W))``: the spectral norm is capped at ``bound`` without being
    forced to it (``torch``'s spectral norm always rescales to σ = 1). σ is estimated by power iteration on ``W``
    reshaped to ``(out, −1)`` (50 steps at creation, then one per evaluation in training mode, with ``u``/``v``
    buffers like ``W``); the estimate approaches σ from below, so the cap holds up to its error."""

    _u: Tensor
    _v: Tensor

    def __init__(self, weight: Tensor, bound: float, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"spectral bound must be a finite number > 0, got {bound!r}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be ≥ 1, got {n_power_iterations!r}")
        self.bound, self.n_power_iterations, self.eps = float(bound), n_power_iterations, eps
        matrix = weight.detach().flatten(1)
        generator = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(matrix.shape[0], generator=generator).to(weight.device, weight.dtype)
        v = torch.randn(matrix.shape[1], generator=generator).to(weight.device, weight.dtype)
        self.register_buffer("_u", nn.functional.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", nn.functional.normalize(v, dim=0, eps=eps))
        self._power_iteration(matrix, 50)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._v.copy_(nn.functional.normalize(matrix.T @ self._u, dim=0, eps=self.eps))
            self._u.copy_(nn.functional.normalize(matrix @ self._v, dim=0, eps=self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate of ``σ(W)`` (differentiable in ``W``)."""
        return torch.dot(self._u, weight.flatten(1) @ self._v)

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self._power_iteration(weight.detach().flatten(1), self.n_power_iterations)
        scale = torch.clamp(self.bound / self.sigma(weight), max=1.0)
        return weight * scale


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    bound: float | None = None,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> nn.Module:
    """Spectral normalisation of ``module.<name>``.

    ``bound=None``: ``W / σ(W)`` (``torch.nn.utils.parametrizations.spectral_norm``). ``bound=c``: a hard cap
    ``σ ≤ c`` — ``W`` is rescaled only when its estimated spectral norm exceeds c, so a block
    ``tanh(W z + x)`` stays c-Lipschitz in z while W keeps its learned scale below the cap.
    """
    if bound is None:
        return _torch_spectral_norm(module, name=name, n_power_iterations=n_power_iterations, eps=eps)
    weight = getattr(module, name)
    parametrize.register_parametrization(
        module, name, SpectralBound(weight, bound, n_power_iterations=n_power_iterations, eps=eps)
    )
    return module
