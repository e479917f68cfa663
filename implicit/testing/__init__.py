"""Gradient checks for users' own DEQs.

``check_gradients`` / ``assert_gradients`` compare an implicit layer's gradients with long unrolling, finite
differences and ``torch.autograd.gradcheck`` on a float64 copy; :mod:`implicit.testing.strategies` (needs
hypothesis) draws state pytrees, contractive blocks and solver options; ``python -m implicit.testing
module:factory`` runs the checks from the command line; the pytest plugin adds the ``implicit_gradients`` fixture and
marker.
"""

from .check import REFERENCES, Check, GradientReport, assert_gradients, check_gradients

__all__ = ["REFERENCES", "Check", "GradientReport", "assert_gradients", "check_gradients"]
