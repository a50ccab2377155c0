"""The per-trial rate search and the goodput objective, without a server."""

from __future__ import annotations

import pytest
from kvpilot.tuner.objective import SLO, Measurement, RateSearch, RateSearchSettings, outcome

SLO_ = SLO(ttft_p95_ms=200, itl_p95_ms=50)


def m(rate: float, tput: float, ttft: float = 0.1, itl: float = 0.02, failed: int = 0) -> Measurement:
    return Measurement(request_rate=rate, output_tokens_per_s=tput, ttft_p95_s=ttft, itl_p95_s=itl,
                       requests_ok=10, requests_failed=failed)


def test_violation_is_the_largest_relative_overshoot() -> None:
    assert m(1, 10).violation(SLO_) == 0.0 and m(1, 10).meets(SLO_)
    assert m(1, 10, ttft=0.3).violation(SLO_) == pytest.approx(0.5)
    assert m(1, 10, itl=0.1).violation(SLO_) == pytest.approx(1.0)
    assert m(1, 10, failed=10).violation(SLO_) == pytest.approx(0.5)
    assert not Measurement(request_rate=1, output_tokens_per_s=0).meets(SLO_)
    unseen = Measurement(request_rate=1, output_tokens_per_s=5, requests_ok=3)  # completed, but no latency figures
    assert unseen.violation(SLO_) == 1.0 and not unseen.meets(SLO_)


def test_grows_while_the_slo_holds_then_bisects() -> None:
    search = RateSearch(SLO_, RateSearchSettings(start_rate=4, steps=4, headroom=0))
    assert search.next_rate() == 4
    search.record(m(4, 100))
    assert search.next_rate() == 8
    search.record(m(8, 200))
    assert search.next_rate() == 16
    search.record(m(16, 300, ttft=0.5))
    assert search.next_rate() == pytest.approx((8 * 16) ** 0.5)
    search.record(m(11.3, 250))
    assert search.next_rate() is None  # the step budget is spent
    result = outcome(search, gpus=2)
    assert result.status == "ok" and result.goodput_tokens_per_s == 250 and result.goodput_per_gpu == 125
    assert result.request_rate == 11.3 and result.constraints == [0.0]


def test_backs_off_when_the_first_step_fails_and_gives_up_below_min_rate() -> None:
    search = RateSearch(SLO_, RateSearchSettings(start_rate=1, min_rate=0.3, steps=5, headroom=0))
    search.record(m(1, 20, itl=0.2))
    assert search.next_rate() == 0.5
    search.record(m(0.5, 10, itl=0.15))
    assert search.next_rate() is None  # 0.25 < min_rate
    result = outcome(search, gpus=1)
    assert result.status == "slo_unmet" and result.goodput_per_gpu == 0
    assert result.violation == pytest.approx(2.0) and result.constraints[0] > 0


def test_stops_when_bounds_are_within_ten_percent_and_at_max_rate() -> None:
    search = RateSearch(SLO_, RateSearchSettings(start_rate=10, steps=9, headroom=0))
    search.record(m(10, 100))
    search.record(m(10.5, 100, ttft=1.0))
    assert search.next_rate() is None
    capped = RateSearch(SLO_, RateSearchSettings(start_rate=4, max_rate=6, steps=9, headroom=0))
    capped.record(m(4, 10))
    assert capped.next_rate() == 6
    capped.record(m(6, 10))
    assert capped.next_rate() is None


def test_min_throughput_is_a_service_constraint() -> None:
    slo = SLO(ttft_p95_ms=200, min_throughput_tokens_per_second=500)
    search = RateSearch(slo, RateSearchSettings(steps=1, headroom=0))
    search.record(m(4, 250))
    result = outcome(search, gpus=1)
    assert result.status == "slo_unmet" and result.violation == pytest.approx(0.5)
    assert "below the floor" in result.reason


def test_headroom_keeps_the_credited_rate_clear_of_the_slo() -> None:
    search = RateSearch(SLO_, RateSearchSettings(start_rate=4, steps=2, headroom=0.2))
    search.record(m(4, 100, ttft=0.17))  # under 200 ms but over 160 ms: not credited
    assert search.best is None and search.next_rate() == 2
    assert SLO_.tightened(0.2).ttft_p95_ms == pytest.approx(160)


def test_the_credited_rate_must_hold_over_the_confirm_step() -> None:
    from kvpilot.tuner.objective import confirmed_outcome

    search = RateSearch(SLO_, RateSearchSettings(start_rate=4, steps=3, headroom=0))
    for step in (m(4, 100), m(8, 200), m(16, 300, ttft=0.5)):
        search.record(step)
    held = confirmed_outcome(search, m(8, 190), gpus=1)
    assert held.status == "ok" and held.goodput_tokens_per_s == 190 and len(held.steps) == 4
    broke = confirmed_outcome(search, m(8, 180, ttft=0.3), gpus=1)
    assert broke.status == "ok" and broke.request_rate == 4 and broke.goodput_tokens_per_s == 100
    assert "did not hold over the confirm step" in broke.reason
    alone = RateSearch(SLO_, RateSearchSettings(start_rate=4, steps=1, headroom=0))
    alone.record(m(4, 100))
    assert confirmed_outcome(alone, m(4, 90, itl=0.2), gpus=1).status == "slo_unmet"
