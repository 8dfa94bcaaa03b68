"""llmwatts.stats: the one percentile definition (numpy 'linear'), shared by the load summary and the report."""

import numpy as np
import pytest

from llmwatts.errors import InvalidArgument
from llmwatts.stats import METHOD, percentile, percentiles


def test_percentile_is_linear_interpolation_between_order_statistics():
    values = [400.0, 100.0, 300.0, 200.0]
    assert percentile(values, 50) == 250.0
    assert percentile(values, 95) == pytest.approx(385.0)  # rank 0.95·3 = 2.85: 300 + 0.85 × 100
    assert percentile(values, 0) == 100.0 and percentile(values, 100) == 400.0
    assert percentiles(values, (50, 99)) == [250.0, pytest.approx(397.0)]
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None and percentile([None], 50) is None
    rng = np.random.default_rng(3)
    data = rng.lognormal(size=501).tolist()
    assert percentile(data, 99) == pytest.approx(float(np.percentile(data, 99, method=METHOD)))


@pytest.mark.parametrize("pct", [-1, 100.5, float("nan")])
def test_a_percentile_outside_0_to_100_is_refused(pct):
    with pytest.raises(InvalidArgument, match="within 0..100"):
        percentile([1.0], pct)
