import random
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from workerpool.backoff import backoff_bound, compute_backoff


class FixedRandom(random.Random):
    """random() always returns ``value``, so uniform(a, b) hits a chosen point."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


bases = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
caps = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)


@given(retry=st.integers(1, 5000), base=bases, cap=caps, seed=st.integers(0, 2**32))
@example(retry=1075, base=5e-324, cap=10.0, seed=0)  # a subnormal base: 1,074 doublings make it 1.0
def test_delay_lies_within_the_capped_exponential_bound(retry, base, cap, seed):
    base = min(base, cap)
    exact = Fraction(base) * 2 ** (retry - 1)  # exact, so no overflow in the oracle
    bound = float(min(Fraction(cap), exact))
    delay = compute_backoff(retry, base=base, cap=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= bound


@given(base=st.floats(min_value=1e-3, max_value=10.0), cap=st.floats(min_value=10.0, max_value=1000.0))
def test_bound_doubles_until_it_reaches_the_cap_then_stays(base, cap):
    bounds = [backoff_bound(n, base=base, cap=cap) for n in range(1, 80)]
    assert bounds[0] == pytest.approx(base)
    for earlier, later in zip(bounds, bounds[1:]):
        assert later == pytest.approx(min(cap, earlier * 2))
    assert bounds[-1] == cap


def test_full_jitter_spans_zero_to_the_bound():
    assert compute_backoff(3, base=0.1, cap=10, rng=FixedRandom(0.0)) == 0.0
    assert compute_backoff(3, base=0.1, cap=10, rng=FixedRandom(0.5)) == pytest.approx(0.2)
    assert compute_backoff(30, base=0.1, cap=10, rng=FixedRandom(0.5)) == pytest.approx(5.0)


def test_huge_retry_numbers_cap_without_overflow():
    assert backoff_bound(10**6, base=0.1, cap=10.0) == 10.0


def test_retry_numbers_start_at_one():
    with pytest.raises(ValueError, match="retry number must be >= 1"):
        backoff_bound(0, base=0.1, cap=10.0)
