import math

import pytest

from qlib import report


def test_difference_rule():
    two_se, real = report.difference_is_real(90.5, 0.1, 90.0, 0.1, n=3)
    assert math.isclose(two_se, 2 * math.sqrt(0.02 / 3)) and real
    assert not report.difference_is_real(90.1, 0.2, 90.0, 0.2, n=3)[1]
    two_se, real = report.difference_is_real(90.5, math.nan, 90.0, math.nan, n=1)
    assert math.isnan(two_se) and not real
    assert report.difference_is_real(92.0, math.nan, 90.0, math.nan, n=1)[1]


def test_seed_proof_verdict_needs_every_run_to_agree():
    b, w, n = ({"verdict": v} for v in ("better", "worse", "not distinguishable"))
    assert report.seed_proof([b, b, b]) == "better"
    assert report.seed_proof([w, w]) == "worse"
    assert report.seed_proof([b, b, n]) == "not distinguishable"
    assert report.seed_proof([b, w]) == "not distinguishable"
    assert report.seed_proof([n]) == "not distinguishable"
    with pytest.raises(ValueError, match="no runs"):
        report.seed_proof([])
