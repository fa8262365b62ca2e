"""The benchmark table's verdicts: the figure printed beside PASS or FAIL never reads as
the limit itself when it is not (a failing 0.4998 against ">= 0.5" printed as "0.50")."""

from __future__ import annotations

import pytest

from bench.report import fmt_against


@pytest.mark.parametrize(
    ("value", "limit", "printed"),
    [
        (0.4998, 0.5, "0.4998"),  # fails ">= 0.5"
        (0.50012, 0.5, "0.5001"),  # passes it
        (2.5037, 2.5, "2.504"),  # fails "<= 2.5"
        (0.5, 0.5, "0.50"),  # exactly the limit
        (0.61, 0.5, "0.61"),  # far from it: the table's own format
        (47.12, 80, "47.1"),
    ],
)
def test_a_verdicts_figure_does_not_round_onto_the_limit(
    value: float, limit: float, printed: str
) -> None:
    assert fmt_against(value, limit) == printed
