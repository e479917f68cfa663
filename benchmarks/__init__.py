"""Benchmarks of torch-implicit (not part of ``make test``).

``python -m benchmarks.solver_overhead`` prints the solver-overhead, time-to-tolerance and backward-cost tables
(side by side with TorchDEQ 0.1.0 when it is installed); ``--write`` refreshes ``benchmarks/RESULTS.md``.
``python -m pytest benchmarks/ --benchmark-only`` runs the pytest-benchmark versions of the overhead rows.
"""
