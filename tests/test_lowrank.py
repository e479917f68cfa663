"""``LowRankInverse``: the one low-rank inverse-Jacobian type of Broyden, adjoint Broyden and SHINE, against dense
matrices ``H = −I + Σ u_i v_iᵀ``."""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit import LowRankInverse


def _factors(batch: int = 3, rank: int = 4, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, rank, n, generator=g, dtype=torch.float64) for _ in range(2))  # type: ignore[return-value]


def _dense(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``H[b] = −I + Σ_i u_i v_iᵀ`` as ``(B, N, N)``."""
    n = U.shape[2]
    return -torch.eye(n, dtype=U.dtype) + torch.einsum("bri,brj->bij", U, V)


@pytest.mark.parametrize("rank", [0, 1, 4])
@pytest.mark.parametrize("rows", [None, 2])
def test_products_equal_the_dense_matrix(rank, rows):
    U, V = _factors(rank=rank)
    H = LowRankInverse(U, V)
    dense = _dense(U, V)
    shape = (3, 7) if rows is None else (3, rows, 7)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x3 = x if rows else x[:, None]
    hx = torch.einsum("bij,bkj->bki", dense, x3)  # H x for every row x
    xh = torch.einsum("bki,bij->bkj", x3, dense)  # xᵀ H
    squeeze = (lambda t: t) if rows else (lambda t: t[:, 0])
    torch.testing.assert_close(H.matvec(x), squeeze(hx), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(H.rmatvec(x), squeeze(xh), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(H.matvec(x, negate=True), -squeeze(hx), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(H.rmatvec(x, negate=True), -squeeze(xh), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(H.transpose().matvec(x), H.rmatvec(x), rtol=1e-13, atol=1e-13)
    assert H.rank == rank and x.shape == H.matvec(x).shape


@pytest.mark.parametrize("rank", [0, 1, 4])
@pytest.mark.parametrize("rows", [None, 2])
@pytest.mark.parametrize("negate", [False, True])
def test_products_written_into_out_equal_the_returned_ones(rank, rows, negate):
    """``out=`` (how Broyden writes a new pair into its own buffer slot) gives the same values, in ``out``, for both
    products, for factors that are strided views (Broyden's slot-major buffers) and for rank 0."""
    slots = torch.randn(8, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    U, V = slots[:rank].transpose(0, 1), slots[rank : 2 * rank].transpose(0, 1)  # (B, rank, N), not contiguous
    H = LowRankInverse(U, V)
    x = torch.randn((3, 7) if rows is None else (3, rows, 7), dtype=torch.float64)
    for product in (H.matvec, H.rmatvec):
        out = torch.full_like(x, float("nan"))
        returned = product(x, negate=negate, out=out)
        assert returned.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, product(x, negate=negate), rtol=1e-15, atol=1e-15)


def test_rank_zero_is_minus_the_identity_bitwise():
    x = torch.randn(2, 5)
    H = LowRankInverse.identity(x)
    assert H.rank == 0 and torch.equal(H.matvec(x), -x) and H.rmatvec(x, negate=True) is x


def test_factors_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        LowRankInverse(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"\(B, r, N\)"):
        LowRankInverse(torch.zeros(3, 4), torch.zeros(3, 4))


def test_broyden_estimate_satisfies_the_secant_condition_of_its_last_step():
    """Good Broyden's update makes ``H_{k+1} y_k = s_k`` (Broyden 1965): the exported estimate maps the last change
    of the residual to the last step, checked on a linear map with a memory that never restarts."""
    g = torch.Generator().manual_seed(2)
    A = 0.5 * torch.randn(6, 6, dtype=torch.float64, generator=g) / 6**0.5
    b = torch.randn(2, 6, dtype=torch.float64, generator=g)
    points: list[torch.Tensor] = []

    def fn(z: torch.Tensor) -> torch.Tensor:
        points.append(z)
        return z @ A.T + b

    result = implicit.solve(
        fn,
        torch.zeros(2, 6, dtype=torch.float64),
        solver="broyden",
        tol=0.0,
        max_iter=4,
        solver_options={"memory": 20},
        check_every=1,
    )
    residual = [fn(z) - z for z in points[:4]]  # g at z_0 … z_3, recomputed after the solve
    s, y = points[3] - points[2], residual[3] - residual[2]  # the last pair: steps 1, 2, 3 each stored one
    H = result.inverse_jacobian
    assert H is not None and H.rank == 3
    torch.testing.assert_close(H.matvec(y), s, rtol=1e-10, atol=1e-12)
