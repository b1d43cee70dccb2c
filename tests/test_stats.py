"""The statistics behind `minsota compare`, against values from standard t tables."""

import math

import pytest

from minsota.stats import confidence_half_width, incomplete_beta, mean_std, paired_difference, t_quantile, t_two_sided_p


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("t, df, expected", [(2.0, 10, 0.073388), (1.0, 1, 0.5), (0.0, 5, 1.0), (3.0, 3, 0.057669)])
def test_two_sided_p_matches_the_table(t, df, expected):
    assert t_two_sided_p(t, df) == pytest.approx(expected, abs=1e-6)


def test_incomplete_beta_identities():
    assert incomplete_beta(3.0, 3.0, 0.5) == pytest.approx(0.5)  # symmetric: half the mass below 1/2
    assert incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)  # Beta(1, 1) is uniform
    assert incomplete_beta(2.5, 0.5, 0.2) + incomplete_beta(0.5, 2.5, 0.8) == pytest.approx(1.0)


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


def test_paired_difference():
    d = paired_difference([1.0, 2.0, 3.0], [1.5, 2.4, 3.7])  # differences 0.5, 0.4, 0.7
    se = 0.152753 / math.sqrt(3)
    assert d.mean == pytest.approx(0.533333, abs=1e-6)
    assert (d.ci_low, d.ci_high) == pytest.approx((0.533333 - 4.302653 * se, 0.533333 + 4.302653 * se), abs=1e-5)
    assert d.p_value == pytest.approx(t_two_sided_p(0.533333 / se, 2), abs=1e-5)
    assert d.p_value < 0.05


def test_pairing_sees_a_consistent_difference_that_seed_noise_hides():
    base, variant = [2.0, 3.0, 4.0, 5.0], [1.9, 2.91, 3.9, 4.89]  # seeds vary by 1.0, the variant is ~0.1 better
    d = paired_difference(base, variant)
    assert d.p_value < 1e-3 and d.ci_high < 0


def test_paired_difference_edge_cases():
    one_seed = paired_difference([1.0], [1.2])
    assert one_seed.mean == pytest.approx(0.2) and one_seed.p_value is None and one_seed.ci_low is None
    same = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (same.mean, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_the_confidence_interval_of_a_mean_is_two_sided():
    # 3 values with std 1: t(0.975 one-sided, df 2) = 4.303, so the 95% interval is mean ± 4.303/sqrt(3)
    assert confidence_half_width(1.0, 3) == pytest.approx(4.303 / 3**0.5, abs=1e-3)
