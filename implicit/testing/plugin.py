"""pytest plugin of torch-implicit (registered through the ``pytest11`` entry point ``implicit``).

Installing the package is enough: any test can take the ``implicit_gradients`` fixture, a callable
``check(layer_or_block, x, **overrides)`` that runs :func:`implicit.testing.assert_gradients` and returns the report;
``@pytest.mark.implicit_gradients(**kwargs)`` on the test, its class or module (``pytestmark``) sets the defaults of
those keyword arguments (the closest marker wins, call-time overrides win over all)::

    @pytest.mark.implicit_gradients(backward="phantom", references=("unrolled",))
    def test_my_deq(implicit_gradients):
        report = implicit_gradients(MyBlock(), torch.randn(4, 16))
        assert report.approximate

Disable with ``-p no:implicit``. The plugin imports neither hypothesis nor the checker until the fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .check import GradientReport

MARKER = "implicit_gradients"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**kwargs): keyword arguments of implicit.testing.check_gradients used by the {MARKER} fixture "
        "(references=, rtol=, min_cosine=, train=, seed=, and layer options such as solver=, backward=, "
        "backward_solver=); the closest marker wins, call-time overrides win over markers",
    )


def marker_kwargs(node: pytest.Item) -> dict[str, Any]:
    """The keyword arguments of every ``implicit_gradients`` marker on ``node``, the closest winning."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(MARKER))):  # iter_markers yields the closest first
        if mark.args:
            pytest.fail(
                f"@pytest.mark.{MARKER} takes keyword arguments only (those of check_gradients), got {mark.args!r}",
                pytrace=False,
            )
        merged.update(mark.kwargs)
    return merged


@pytest.fixture
def implicit_gradients(request: pytest.FixtureRequest) -> Callable[..., GradientReport]:
    """``check(layer_or_block, x, **overrides)``: :func:`implicit.testing.assert_gradients` with the keyword arguments
    of the test's ``implicit_gradients`` markers updated by ``overrides``; returns the report and fails the test
    with the report's table when a gradient is wrong."""
    configured = marker_kwargs(request.node)

    def check(target: Any, x: Any, **overrides: Any) -> GradientReport:
        __tracebackhide__ = True
        from .check import check_gradients

        # assert_gradients, raising from here so that pytest shows the table under the test's own line and the
        # report's first line (the verdict) in its short summary.
        report = check_gradients(target, x, **{**configured, **overrides})
        if not report.passed:
            raise AssertionError(report.table())
        return report

    return check
