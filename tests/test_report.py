import math

import pytest

from qlib import report


def test_difference_rule_is_a_t_test_on_the_pooled_spread():
    from scipy import stats

    sd, df = report.pooled_sd([0.1, 0.3, float("nan"), 0.0], [2, 3, 1, 2])
    assert df == 1 + 2 + 1 and math.isclose(sd, math.sqrt((0.01 + 2 * 0.09 + 0.0) / 4))
    half, real = report.difference_is_real(90.5, 90.0, 2, 2, 0.1, 8)
    assert math.isclose(half, stats.t.ppf(0.975, 8) * 0.1 * math.sqrt(1.0)) and real
    assert not report.difference_is_real(90.2, 90.0, 2, 2, 0.1, 8)[1]
    # the t quantile, not 2: at 2 degrees of freedom a gap of 2.5 pooled-SE units is a tie
    se = 0.1 * math.sqrt(2 / 3)
    assert not report.difference_is_real(90.0 + 2.5 * se, 90.0, 3, 3, 0.1, 2)[1]
    assert report.difference_is_real(90.0 + 2.5 * se, 90.0, 3, 3, 0.1, 60)[1]
    # one seed each: the same rule with the model's pooled spread
    half1, real1 = report.difference_is_real(90.4, 90.0, 1, 1, 0.1, 8)
    assert math.isclose(half1, stats.t.ppf(0.975, 8) * 0.1 * math.sqrt(2)) and real1
    # no repeated seeds anywhere: the one-point margin
    half, real = report.difference_is_real(90.5, 90.0, 1, 1, math.nan, 0)
    assert math.isnan(half) and not real
    assert report.difference_is_real(92.0, 90.0, 1, 1, math.nan, 0)[1]
    with pytest.raises(ValueError, match="at least one seed"):
        report.difference_is_real(90.0, 90.0, 0, 2, 0.1, 4)


def test_two_seeds_with_no_spread_cannot_make_a_tiny_gap_real():
    """A 0.00 std from two runs of each method, against a model whose other runs vary."""
    sd, df = report.pooled_sd([0.0, 0.0, 0.3, 0.25, 0.35], [2, 2, 2, 2, 2])
    assert report.verdict(90.19, 90.0, 2, 2, sd, df, names=("A", "B"))[1] == "tie"


def test_seed_proof_verdict_needs_every_run_to_agree():
    b, w, n = ({"verdict": v} for v in ("better", "worse", "not distinguishable"))
    assert report.seed_proof([b, b, b]) == "better"
    assert report.seed_proof([w, w]) == "worse"
    assert report.seed_proof([b, b, n]) == "not distinguishable"
    assert report.seed_proof([b, w]) == "not distinguishable"
    assert report.seed_proof([n]) == "not distinguishable"
    with pytest.raises(ValueError, match="no runs"):
        report.seed_proof([])


def test_sentence_builders_read_right_in_every_branch():
    assert report.span([0.1234, 0.4]) == "0.12 to 0.40"
    assert report.span([0.121, 0.1234]) == "0.12", "equal ends print one number"
    assert report.span([10.0, 10.04], "{:.3g}", "×") == "10×"
    assert report.span([-0.5, 0.25], "{:+.2f}") == "-0.50 to +0.25"
    with pytest.raises(ValueError):
        report.span([])
    assert report.count_text(1, 6) == "1 of 6 settings"
    assert report.count_text(0, 6) == "none of the 6 settings"
    assert report.count_text(3, 3) == "all 3 settings"
    assert report.count_text(2, 2, "model") == "both models"
    assert report.count_text(1, 1) == "the one setting" and report.count_text(0, 1) == "not the one setting"
    with pytest.raises(ValueError):
        report.count_text(3, 2)
