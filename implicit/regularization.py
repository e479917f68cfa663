"""Jacobian regularisation (Bai, Koltun and Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
ICML 2021, eq. 6): a Hutchinson estimate of ``‖∂f/∂z‖_F²`` at the equilibrium."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .types import FlatMap

PROBES = ("gaussian", "rademacher")


def jacobian_frobenius(
    fn: FlatMap,
    z: Tensor,
    *,
    probes: int = 1,
    probe: str = "gaussian",
    create_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``mean_b ‖J_b‖_F² / N`` at ``z`` (``(B, N)``), ``J = ∂fn/∂z``.

    ``E ‖εᵀ J‖² = ‖J‖_F²`` for Gaussian or Rademacher ε; each probe costs one VJP. With ``create_graph`` (default:
    grad mode is on) the estimate is differentiable, for ``loss + weight * jac_loss``; otherwise it is detached and
    may be called under ``torch.no_grad()`` (for monitoring). ``z`` is held fixed: the estimate's gradient reaches
    the parameters and inputs of f, not the point it is taken at.

    The differentiable estimate needs second derivatives of f, which PyTorch's fused attention kernels (flash,
    memory-efficient) do not have; its call of f runs with the math kernel of ``scaled_dot_product_attention``
    (same values up to round-off), so blocks with attention, e.g. ``nn.TransformerEncoderLayer``, can be regularised.
    """
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    batch, n = z.shape
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
            fz = fn(z)
        total = z.new_zeros(())
        for _ in range(probes):
            if probe == "gaussian":
                eps = torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator)
            else:
                eps = torch.randint(0, 2, fz.shape, device=fz.device, generator=generator).to(fz.dtype) * 2 - 1
            (vjp,) = torch.autograd.grad(fz, z, eps, create_graph=create_graph, retain_graph=True)
            total = total + vjp.pow(2).sum()
    estimate = total / (probes * batch * n)
    return estimate if create_graph else estimate.detach()
