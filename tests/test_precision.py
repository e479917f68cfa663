"""Reduced precision: bf16 states are solved in float32; f may run under autocast."""

from __future__ import annotations

import copy

import torch
from torch import nn

from implicit import make_implicit


class _Tanh(nn.Module):
    def __init__(self, width: int = 32, lipschitz: float = 0.8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(width, width)
        with torch.no_grad():
            weight = torch.randn(width, width, generator=generator)
            self.linear.weight.copy_(lipschitz * weight / torch.linalg.matrix_norm(weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def test_bf16_state_is_solved_in_float32_and_returned_in_bf16():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    block = _Tanh().to(torch.bfloat16)
    reference = make_implicit(copy.deepcopy(block).float(), tol=1e-6, max_iter=100)  # same rounded weights
    x = x.float()
    z_ref = reference(x)
    grad_ref = torch.autograd.grad(z_ref.sum(), reference.block.linear.weight)[0]

    deq = make_implicit(block, tol=1e-3, max_iter=100, on_divergence="raise")
    z, info = deq(x.to(torch.bfloat16), return_info=True)
    assert z.dtype == torch.bfloat16
    assert info.forward.z.dtype == torch.float32
    assert bool(info.forward.converged.all())
    # bf16 arithmetic inside f moves the equilibrium by about its resolution (2^-8).
    assert float((z.detach().float() - z_ref.detach()).abs().max()) < 1e-2
    grad = torch.autograd.grad(z.float().sum(), deq.block.linear.weight)[0]
    assert grad.dtype == torch.bfloat16
    assert _cosine(grad, grad_ref) > 0.98


def test_autocast_block_output_is_accepted_and_state_stays_float32():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    deq = make_implicit(_Tanh(), tol=1e-3, max_iter=100)
    z_ref = deq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls stall near rel. residual 1e-3
        z, info = deq(x, return_info=True, tol=1e-2)
    assert z.dtype == torch.float32
    assert bool(info.forward.converged.all())
    assert float((z.detach() - z_ref.detach()).abs().max()) < 5e-2
    grad = torch.autograd.grad(z.sum(), deq.block.linear.weight)[0]
    grad_ref = torch.autograd.grad(deq(x).sum(), deq.block.linear.weight)[0]
    assert _cosine(grad, grad_ref) > 0.98
