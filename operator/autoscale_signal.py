"""The autoscaler's signals, read from Prometheus: the one side effect behind the pure autoscale.py.

Demand counts requests where they arrive, at the routers (`kvpilot:router_requests_received`, which exists with
no engine at all), times the output tokens a request has been taking on the active revision's engines: what
engines serve alone would cap demand at today's capacity. Waiting requests are the routers' queue plus the
engines' own queues. SLO attainment is the share of the active revision's requests within the SLO's TTFT and ITL.
"""

from __future__ import annotations

from kvpilot.operator import resources as res
from kvpilot.operator.autoscale import Reading
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.tuner.metrics import GENERATION_TOKENS, ITL, TTFT, Prometheus, PrometheusError, attainment, selector

ROUTER_ARRIVALS = "kvpilot:router_requests_received_total"
ROUTER_QUEUE = "kvpilot:router_queue_depth"
ENGINE_WAITING = "kvpilot:num_requests_waiting"
ENGINE_FINISHED = "kvpilot:request_success_total"


def _ms_to_s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def read_signals(prom: Prometheus, namespace: str, name: str, active: str | None,
                 spec: InferenceServiceSpec, window_seconds: int) -> Reading:
    tenant = {"namespace": namespace, "inferenceservice": name}
    engines = res.series_labels(namespace, name, active) if active else None
    w = f"{window_seconds}s"
    try:
        arrivals = prom.scalar(f"sum(rate({ROUTER_ARRIVALS}{selector(tenant)}[{w}]))")
        waiting = prom.scalar(f"sum({ROUTER_QUEUE}{selector(tenant)})") or 0.0
        demand = share = None
        if engines:
            waiting += prom.scalar(f"sum({ENGINE_WAITING}{selector(engines)})") or 0.0
            tokens = prom.scalar(f"sum(rate({GENERATION_TOKENS}{selector(engines)}[{w}]))")
            finished = prom.scalar(f"sum(rate({ENGINE_FINISHED}{selector(engines)}[{w}]))")
            if tokens is not None and finished:
                demand = (arrivals if arrivals is not None else finished) * tokens / finished
            elif tokens is not None:
                demand = tokens
            targets = {TTFT: _ms_to_s(spec.slo.ttft_p95_ms), ITL: _ms_to_s(spec.slo.itl_p95_ms)}
            share = attainment(prom, engines, targets, window_seconds)
    except PrometheusError as exc:
        return Reading(error=str(exc))
    return Reading(demand_tokens_per_s=demand, arrivals_per_s=arrivals, waiting=waiting, attainment=share)
