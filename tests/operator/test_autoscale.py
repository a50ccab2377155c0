"""The autoscaler's pure core: what each signal recommends, and the stabilisation windows that keep it calm."""

from __future__ import annotations

import datetime as dt

import pytest
from kvpilot.operator.autoscale import Reading, autoscaling_part, recommend, stabilize
from kvpilot.operator.spec import AutoscalingSpec, parse_spec
from kvpilot.operator.status import Recommendation
from pydantic import ValidationError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def auto(**fields: object) -> AutoscalingSpec:
    return AutoscalingSpec.model_validate(fields)


def test_demand_over_goodput_at_the_slo_sets_replicas_within_bounds():
    spec = auto(minReplicas=1, maxReplicas=5, targetUtilization=0.5)
    assert recommend(spec, Reading(demand_tokens_per_s=250, arrivals_per_s=2), 1, goodput=100).replicas == 5
    assert recommend(spec, Reading(demand_tokens_per_s=120, arrivals_per_s=2), 1, goodput=100).replicas == 3
    assert recommend(spec, Reading(demand_tokens_per_s=1000, arrivals_per_s=9), 1, goodput=100).replicas == 5
    idle = recommend(spec, Reading(demand_tokens_per_s=0, arrivals_per_s=0, waiting=0), 3, goodput=100)
    assert (idle.replicas, idle.reason) == (1, "Demand")


def test_demand_without_a_goodput_figure_holds_and_says_why():
    rec = recommend(auto(), Reading(demand_tokens_per_s=500), 2, goodput=None)
    assert (rec.replicas, rec.reason) == (2, "NoCapacityFigure")


def test_from_zero_the_first_request_brings_one_replica_and_idle_goes_back_to_zero():
    spec = auto(minReplicas=0, maxReplicas=3)
    first = recommend(spec, Reading(arrivals_per_s=0.1, waiting=1), 0, goodput=None)
    assert (first.replicas, first.reason) == (1, "ScaleFromZero")
    idle = recommend(spec, Reading(demand_tokens_per_s=0, arrivals_per_s=0, waiting=0), 1, goodput=50)
    assert idle.replicas == 0


def test_queue_depth_and_slo_attainment_signals():
    queue = auto(signal="QueueDepth", targetQueueDepth=4, maxReplicas=10)
    assert recommend(queue, Reading(waiting=17), 2, goodput=None).replicas == 5
    slo = auto(signal="SLOAttainment", targetAttainment=0.9, maxReplicas=4)
    assert recommend(slo, Reading(attainment=0.7, arrivals_per_s=3), 2, goodput=None).replicas == 3
    assert recommend(slo, Reading(attainment=0.95, arrivals_per_s=3), 2, goodput=None).replicas == 2
    assert recommend(slo, Reading(attainment=0.5, arrivals_per_s=3), 4, goodput=None).replicas == 4  # maxReplicas


def test_an_unreadable_signal_holds_the_current_count():
    rec = recommend(auto(), Reading(error="Prometheus query failed: HTTP 503"), 3, goodput=100)
    assert (rec.replicas, rec.reason) == (3, "SignalUnavailable")


def test_scale_down_waits_out_its_window_and_scale_up_is_at_once():
    spec = auto(scaleDownStabilizationSeconds=60, scaleUpStabilizationSeconds=0)
    history = [Recommendation(at=at(0), replicas=4), Recommendation(at=at(30), replicas=2)]
    assert stabilize(spec, history, raw=1, current=4, at=at(40)) == 4  # 4 was recommended 40 s ago
    assert stabilize(spec, history, raw=1, current=4, at=at(61)) == 2  # only 2 (at 30 s) is still in the window
    assert stabilize(spec, history, raw=1, current=4, at=at(95)) == 1
    assert stabilize(spec, history, raw=6, current=4, at=at(40)) == 6


def test_a_scale_up_window_takes_the_lowest_recent_recommendation():
    spec = auto(scaleUpStabilizationSeconds=30)
    history = [Recommendation(at=at(0), replicas=2), Recommendation(at=at(20), replicas=5)]
    assert stabilize(spec, history, raw=6, current=2, at=at(25)) == 2  # a spike of one reading does not scale
    assert stabilize(spec, history, raw=6, current=2, at=at(35)) == 5


def test_the_part_reports_desired_current_and_reason_with_an_event_on_each_change():
    spec = auto(minReplicas=1, maxReplicas=4, scaleDownStabilizationSeconds=60)
    up = autoscaling_part(spec, None, Reading(demand_tokens_per_s=300, arrivals_per_s=3), 1, 1, 100, at(0))
    status = up.fields["autoscaling"]
    assert (status.desired_replicas, status.current_replicas, status.reason) == (4, 1, "Demand")
    assert [e.reason for e in up.events] == ["ScaledUp"] and "1 -> 4 replicas" in up.events[0].message
    lull = autoscaling_part(spec, status, Reading(demand_tokens_per_s=50, arrivals_per_s=1), 4, 4, 100, at(10))
    assert lull.fields["autoscaling"].desired_replicas == 4 and not lull.events
    assert "stabilisation window holds 4" in lull.fields["autoscaling"].message
    later = autoscaling_part(spec, lull.fields["autoscaling"], Reading(demand_tokens_per_s=50, arrivals_per_s=1),
                             4, 4, 100, at(75))
    assert later.fields["autoscaling"].desired_replicas == 1
    assert [e.reason for e in later.events] == ["ScaledDown"]


def test_min_above_max_is_refused():
    with pytest.raises(ValidationError, match="minReplicas"):
        parse_spec({"model": {"uri": "demo"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
