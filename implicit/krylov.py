"""Batched Krylov building blocks shared by GMRES and the Arnoldi spectral-radius estimate."""

from __future__ import annotations

import torch
from torch import Tensor


def orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonalise rows ``w`` ``(B, N)`` against orthonormal rows ``basis`` ``(B, j, N)`` per sample with classical
    Gram–Schmidt applied twice (orthogonal to round-off, two passes over the basis). Returns ``(w⊥, h)`` with
    ``w = h · basis + w⊥``, ``h`` of shape ``(B, j)``."""
    basis_t = basis.transpose(1, 2)
    h = torch.bmm(w[:, None], basis_t)[:, 0]
    w = w - torch.bmm(h[:, None], basis)[:, 0]
    h2 = torch.bmm(w[:, None], basis_t)[:, 0]
    return w - torch.bmm(h2[:, None], basis)[:, 0], h + h2


def normalize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``w`` scaled to unit norm (zero rows stay zero) and their norms ``(B,)``."""
    norm = torch.linalg.vector_norm(w, dim=1)
    return w / torch.where(norm > 0, norm, 1.0)[:, None], norm
