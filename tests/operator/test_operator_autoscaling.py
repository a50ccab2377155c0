"""spec.autoscaling through the real operator: Prometheus's signals move the active revision's replicas, status
and Events say why, and a scale-down waits out its stabilisation window."""

from __future__ import annotations

from .conftest import NAMESPACE, isvc
from .emulator import Emulator
from .flows import create, deploy_ready, event_reasons, isvc_status, mark_ready, patch_spec
from .harness import FakePrometheus, eventually, wait_passes


def replicas(em: Emulator, deployment: str) -> int | None:
    obj = em.find("deployments", NAMESPACE, deployment)
    return None if obj is None else obj["spec"]["replicas"]


async def test_demand_scales_the_active_revision_up_then_down_after_the_window(
        emulator, start_operator, api, operator_config):
    em, _ = emulator
    # 2 requests/s arrive at the routers; the engines' requests take 150 output tokens each: 300 tokens/s demanded.
    prometheus = FakePrometheus({"router_requests_received": "2", "router_queue_depth": "0",
                                 "num_requests_waiting": "0", "generation_tokens": "300", "request_success": "2"})
    operator_config.allowed_prometheus_urls.append(prometheus.url)
    operator_config.autoscale_refresh_seconds = 0.2
    autoscaling = {"minReplicas": 1, "maxReplicas": 4, "goodputPerReplica": 100, "targetUtilization": 1.0,
                   "scaleDownStabilizationSeconds": 3}
    try:
        start_operator()
        await create(api, isvc("llm", autoscaling=autoscaling, monitoring={"prometheusUrl": prometheus.url}))
        revision = await deploy_ready(api, em, "llm")
        deployment = f"llm-{revision}"
        await eventually(lambda: replicas(em, deployment) == 3, what="3 replicas for 300 tokens/s at 100 each")
        # The pass applies children before it writes status.
        status = await eventually(lambda: (a := isvc_status(em, "llm")["autoscaling"])["desiredReplicas"] == 3 and a,
                                  what="status.autoscaling at 3")
        assert status["reason"] == "Demand"
        assert "300.0 output tokens/s demanded" in status["message"]
        await eventually(lambda: "ScaledUp" in event_reasons(em, "llm"), what="a ScaledUp Event")
        degraded = event_reasons(em, "llm").count("PhaseDegraded")  # the routers may lag the first promotion
        await wait_passes(em, "llm", 3)  # the new replicas are starting: that is no fault
        assert isvc_status(em, "llm")["phase"] == "Ready"
        assert event_reasons(em, "llm").count("PhaseDegraded") == degraded
        await mark_ready(api, em, deployment)
        await eventually(lambda: isvc_status(em, "llm")["autoscaling"]["currentReplicas"] == 3, what="3 serving")

        prometheus.values.update(router_requests_received="0", generation_tokens="0", request_success="0")
        held = await eventually(lambda: "window holds 3" in isvc_status(em, "llm")["autoscaling"]["message"],
                                what="the window holding 3")
        assert held and replicas(em, deployment) == 3
        await eventually(lambda: replicas(em, deployment) == 1, timeout=20, what="back to minReplicas")
        await eventually(lambda: "ScaledDown" in event_reasons(em, "llm"), what="a ScaledDown Event")
    finally:
        prometheus.close()


async def test_without_prometheus_the_count_holds_within_the_bounds(emulator, start_operator, api):
    em, _ = emulator
    start_operator()
    await create(api, isvc("llm", autoscaling={"minReplicas": 2, "maxReplicas": 3}))
    revision = await eventually(lambda: isvc_status(em, "llm").get("candidateRevision"), what="revision")
    await eventually(lambda: replicas(em, f"llm-{revision}") == 2, what="minReplicas")
    status = isvc_status(em, "llm")["autoscaling"]
    assert status["reason"] == "SignalUnavailable" and "no Prometheus" in status["message"]
    await patch_spec(api, "llm", {"autoscaling": None, "replicas": 1})  # off again: spec.replicas serves
    await eventually(lambda: replicas(em, f"llm-{revision}") == 1, what="spec.replicas again")
    await eventually(lambda: "autoscaling" not in isvc_status(em, "llm"), what="status.autoscaling cleared")


async def test_a_rollouts_candidate_comes_up_at_the_autoscaled_count(emulator, start_operator, api, operator_config):
    em, _ = emulator
    prometheus = FakePrometheus({"router_requests_received": "2", "router_queue_depth": "0",
                                 "num_requests_waiting": "0", "generation_tokens": "200", "request_success": "2"})
    operator_config.allowed_prometheus_urls.append(prometheus.url)
    operator_config.autoscale_refresh_seconds = 0.2
    try:
        start_operator()
        await create(api, isvc("llm", replicas=1, monitoring={"prometheusUrl": prometheus.url},
                               autoscaling={"maxReplicas": 4, "goodputPerReplica": 100, "targetUtilization": 1.0}))
        old = await deploy_ready(api, em, "llm")
        await eventually(lambda: replicas(em, f"llm-{old}") == 2, what="2 replicas for 200 tokens/s")
        await patch_spec(api, "llm", {"model": {"revision": "r2"}})
        new = await eventually(lambda: isvc_status(em, "llm").get("candidateRevision"), what="candidate")
        await eventually(lambda: replicas(em, f"llm-{new}") is not None, what="the candidate's Deployment")
        assert replicas(em, f"llm-{new}") == 2 == replicas(em, f"llm-{old}")  # not spec.replicas (1)
    finally:
        prometheus.close()
