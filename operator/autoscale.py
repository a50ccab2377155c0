"""The autoscaler as pure functions: (spec, reading, previous status, now) -> the replicas the active revision gets.

A reading becomes a raw recommendation (`recommend`), which the stabilisation windows smooth (`stabilize`), as an
HPA's behaviour does: a scale-up goes only to the lowest recommendation of the up window, a scale-down only to the
highest of the down window, so a brief lull or spike does not move replicas. The recommendations are kept in
status (state that must survive an operator restart lives in Kubernetes). The operator then gives that count to
the active revision and to a rollout's candidate alike (reconcile.py), so the candidate comes up at the stable
revision's count; tuning trials stay at one replica each and are not counted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

from kvpilot.operator.reducer import Event, Part
from kvpilot.operator.spec import AutoscalingSpec
from kvpilot.operator.status import RECOMMENDATION_LIMIT, AutoscalingStatus, Recommendation


@dataclasses.dataclass(frozen=True)
class Reading:
    """The live signals of one InferenceService over the window; None where there is no data."""

    demand_tokens_per_s: float | None = None  # output tokens/s demanded (arrivals x tokens per request)
    arrivals_per_s: float | None = None  # completion requests/s arriving at the routers
    waiting: float | None = None  # requests the routers queue plus those the engines have waiting
    attainment: float | None = None  # share of requests within the SLO
    error: str | None = None  # the signal could not be read at all


@dataclasses.dataclass(frozen=True)
class Recommended:
    replicas: int
    reason: str
    message: str
    value: float | None = None


def _clamp(spec: AutoscalingSpec, n: int) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, n))


def recommend(spec: AutoscalingSpec, reading: Reading, current: int, goodput: float | None) -> Recommended:
    """The replicas the signal asks for now, within [minReplicas, maxReplicas]; `current` is what serves."""
    if reading.error is not None:
        return Recommended(_clamp(spec, current), "SignalUnavailable", f"holding {current}: {reading.error}")
    pending = (reading.arrivals_per_s or 0) > 0 or (reading.waiting or 0) > 0
    if current == 0 and pending:  # nothing serves and requests wait in the routers' queue
        return Recommended(_clamp(spec, 1), "ScaleFromZero", f"requests arrive ({reading.arrivals_per_s or 0:.2f}/s, "
                           f"{reading.waiting or 0:g} waiting) and no replica serves", reading.waiting)
    if spec.signal == "Demand":
        if goodput is None:
            return Recommended(_clamp(spec, current), "NoCapacityFigure", "no per-replica goodput: declare "
                               "autoscaling.goodputPerReplica or let tuning measure it")
        demand = reading.demand_tokens_per_s or 0.0
        per_replica = goodput * spec.target_utilization
        n = math.ceil(demand / per_replica - 1e-9) if demand > 0 else (1 if pending else 0)
        return Recommended(_clamp(spec, n), "Demand", f"{demand:.1f} output tokens/s demanded over {per_replica:.1f} "
                           f"per replica ({spec.target_utilization:g} of {goodput:.1f} at the SLO)", demand)
    if spec.signal == "QueueDepth":
        waiting = reading.waiting or 0.0
        n = math.ceil(waiting / spec.target_queue_depth - 1e-9) if waiting > 0 else (1 if pending else 0)
        return Recommended(_clamp(spec, n), "QueueDepth",
                           f"{waiting:g} requests waiting, {spec.target_queue_depth:g} per replica", waiting)
    if reading.attainment is None:  # SLOAttainment with no request in the window: idle
        return Recommended(_clamp(spec, 1 if pending else 0), "Idle", "no request in the window")
    if reading.attainment < spec.target_attainment:
        return Recommended(_clamp(spec, current + 1), "SLOMissed", f"{reading.attainment:.1%} of requests within "
                           f"the SLO, below {spec.target_attainment:.0%}", reading.attainment)
    return Recommended(_clamp(spec, current), "SLOMet", f"{reading.attainment:.1%} of requests within the SLO "
                       f"(target {spec.target_attainment:.0%})", reading.attainment)


def stabilize(spec: AutoscalingSpec, history: list[Recommendation], raw: int, current: int, at: dt.datetime) -> int:
    """HPA-style windows: up to the lowest recommendation of the up window, down to the highest of the down one."""
    def within(seconds: int) -> list[int]:
        return [r.replicas for r in history if (at - r.at).total_seconds() < seconds] + [raw]

    if raw > current:
        return max(current, min(within(spec.scale_up_stabilization_seconds)))
    if raw < current:
        return min(current, max(within(spec.scale_down_stabilization_seconds)))
    return current


def autoscaling_part(spec: AutoscalingSpec, previous: AutoscalingStatus | None, reading: Reading, current: int,
                     serving: int, goodput: float | None, at: dt.datetime) -> Part:
    """`current`: the replicas the operator set last (what it scales from); `serving`: those ready now."""
    part = Part()
    rec = recommend(spec, reading, current, goodput)
    horizon = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
    history = [r for r in (previous.recommendations if previous else []) if (at - r.at).total_seconds() < horizon]
    desired = stabilize(spec, history, rec.replicas, current, at)
    held = "" if desired == rec.replicas else f"; the stabilisation window holds {desired} (raw {rec.replicas})"
    last_scale = previous.last_scale_time if previous else None
    if desired != current:
        last_scale = at
        verb = "ScaledUp" if desired > current else "ScaledDown"
        part.events.append(Event("Normal", verb, f"{current} -> {desired} replicas ({rec.reason}): {rec.message}"))
    kept = [*history, Recommendation(at=at, replicas=rec.replicas)][-RECOMMENDATION_LIMIT:]
    part.fields["autoscaling"] = AutoscalingStatus(
        desired_replicas=desired, current_replicas=serving, reason=rec.reason, message=rec.message + held,
        signal_value=None if rec.value is None else round(rec.value, 4), last_scale_time=last_scale,
        recommendations=kept)
    return part
