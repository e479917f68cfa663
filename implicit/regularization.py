"""Jacobian regularisation (Bai, Koltun and Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
ICML 2021, eq. 6): a Hutchinson estimate of ``‖∂f/∂z‖_F²`` at the equilibrium."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

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
    _check_probe(probe)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        with double_backward_attention(create_graph):
            fz = fn(z)
        return frobenius_from_call(z, fz, probes=probes, probe=probe, create_graph=create_graph, generator=generator)


def frobenius_from_call(
    z: Tensor,
    fz: Tensor,
    *,
    probes: int = 1,
    probe: str = "gaussian",
    create_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The estimate of :func:`jacobian_frobenius` from a call already recorded: ``fz = fn(z)`` with ``z`` (``(B, N)``)
    a tensor that requires grad and ``fz`` its graph (e.g. the tracked call of a backward mode). Same probes, same
    arithmetic; the call's graph is kept (``retain_graph``) for its other uses."""
    _check_probe(probe)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    batch, n = z.shape
    with torch.enable_grad():
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


def double_backward_attention(create_graph: bool) -> AbstractContextManager[Any]:
    """The attention kernel for a call of f that will be differentiated twice: the math kernel of
    ``scaled_dot_product_attention`` when ``create_graph`` (fused kernels have no double backward), else no change."""
    return sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()


def _check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")


@dataclass(frozen=True)
class JacobianRegularizer:
    """A layer's Jacobian regulariser: ``probes`` Hutchinson probes of kind ``probe`` (validated options).

    A layer call takes the estimate from the backward mode's tracked call ``f(z*)`` when there is one from a z* that
    requires grad (:meth:`recording` around that call, then :meth:`from_call`); otherwise it calls f itself
    (:meth:`__call__`). Both give the same estimate for the same probes.
    """

    probes: int
    probe: str

    def recording(self) -> AbstractContextManager[Any]:
        """The context of a call of f whose graph the estimate will use (the math attention kernel in grad mode)."""
        return double_backward_attention(torch.is_grad_enabled())

    def from_call(self, z: Tensor, fz: Tensor) -> Tensor:
        """The estimate from the recorded call ``fz = f(z)`` (see :func:`frobenius_from_call`)."""
        return frobenius_from_call(z, fz, probes=self.probes, probe=self.probe)

    def __call__(self, fn: FlatMap, z: Tensor) -> Tensor:
        """The estimate at ``z`` (``(B, N)``) with a call of ``fn`` of its own (see :func:`jacobian_frobenius`)."""
        return jacobian_frobenius(fn, z, probes=self.probes, probe=self.probe)
