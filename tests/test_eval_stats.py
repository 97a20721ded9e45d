"""Win-rate statistics against known values (scipy where it has them, hand-computed otherwise)."""

from __future__ import annotations

import math

import pytest

from halos.eval import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (7, 20), (10, 10), (57, 100), (150, 200)])
def test_intervals_match_scipy(k: int, n: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    result = scipy_stats.binomtest(k, n, 0.5)
    for method, ours in (("wilson", stats.wilson_interval(k, n)),
                         ("exact", stats.clopper_pearson_interval(k, n))):
        ref = result.proportion_ci(confidence_level=0.9, method=method)
        assert ours == pytest.approx((ref.low, ref.high), abs=1e-9), method


def test_wilson_by_hand_with_half_counted_ties() -> None:
    # 10 wins, 5 ties, 3 losses: p = 12.5 / 18, z = 1.6448536...
    z = 1.6448536269514722
    p, n = 12.5 / 18, 18
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.z_value(0.9) == pytest.approx(z, abs=1e-12)
    assert stats.wilson_interval(12.5, 18) == pytest.approx((centre - half, centre + half))
    assert stats.wilson_interval(12.5, 18) == pytest.approx((0.50060, 0.83748), abs=1e-5)


@pytest.mark.parametrize("wins,losses,expected", [
    (10, 3, 0.09228515625),  # 2 * P(X <= 3), X ~ Bin(13, 1/2) = 2 * 378 / 8192
    (5, 5, 1.0), (0, 0, 1.0), (6, 0, 0.03125), (0, 1, 1.0), (1, 0, 1.0),
])
def test_sign_test_known_values(wins: int, losses: int, expected: float) -> None:
    assert stats.sign_test_p_value(wins, losses) == pytest.approx(expected, abs=1e-12)


def test_sign_test_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for wins, losses in ((3, 17), (40, 25), (99, 101), (150, 30)):
        expected = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert stats.sign_test_p_value(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_holm_known_values() -> None:
    # Sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04): monotone step-down.
    assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.02, None, 0.2]) == [pytest.approx(0.04), None, pytest.approx(0.2)]
    assert stats.holm([]) == []
    assert stats.holm([0.03]) == [0.03]
    with pytest.raises(ValueError):
        stats.holm([1.5])


def test_holm_matches_statsmodels_style_reference() -> None:
    p = [0.001, 0.012, 0.014, 0.2, 0.04]
    # m = 5: 5*.001=.005, 4*.012=.048, 3*.014=.042 -> .048 (monotone), 2*.04=.08, 1*.2=.2
    assert stats.holm(p) == pytest.approx([0.005, 0.048, 0.048, 0.2, 0.08])


def test_win_summary() -> None:
    s = stats.win_summary(10, 5, 3)
    assert s["n"] == 18 and s["win_rate"] == pytest.approx(12.5 / 18)
    assert s["ci90"] == pytest.approx(list(stats.wilson_interval(12.5, 18)))
    assert s["p_value"] == pytest.approx(0.09228515625)
    empty = stats.win_summary(0, 0, 0)
    assert empty["win_rate"] is None and empty["ci90"] == [0.0, 1.0] and empty["p_value"] == 1.0


def test_bad_input_is_an_error() -> None:
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 3)
    with pytest.raises(ValueError):
        stats.sign_test_p_value(-1, 2)
    with pytest.raises(ValueError):
        stats.z_value(1.0)
