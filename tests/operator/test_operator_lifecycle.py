"""The real kopf operator against kmock's emulator: creation, readiness, drift, invalid specs, deletion, 409s."""

from __future__ import annotations

import kmock

from .conftest import ISVC_PATH, NAMESPACE, isvc
from .flows import (
    condition,
    create,
    deploy_ready,
    deployment_names,
    event_reasons,
    isvc_status,
    selector,
    serving,
    stable_selects_routers,
)
from .harness import FakePrometheus, eventually, wait_passes


async def test_create_builds_children_and_becomes_ready(emulator, start_operator, api):
    em, _ = emulator
    start_operator()
    await create(api, isvc("llm"))
    revision = await eventually(lambda: isvc_status(em, "llm").get("candidateRevision"), what="revision")
    deployment = await eventually(lambda: em.find("deployments", NAMESPACE, f"llm-{revision}"), what="Deployment")
    await eventually(lambda: em.find("services", NAMESPACE, "llm-metrics"), what="Services")

    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert container["command"] == ["kvpilot", "serve"]
    assert {"--model=demo", f"--revision={revision}", "--served-model-name=demo", "--drain-timeout=5"} <= set(args)
    assert not any(a.startswith("--max-num-seqs") for a in args)  # unset knobs: the engine's defaults
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] > 5 + 5  # drain + preStop sleep
    assert "nvidia.com/gpu" not in container["resources"]["requests"]  # gpusPerReplica: 0
    assert deployment["metadata"]["labels"]["kvpilot.dev/revision"] == revision
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"

    config_map = em.find("configmaps", NAMESPACE, f"llm-{revision}")
    assert config_map is not None and "engine.json" in config_map["data"]
    assert serving(em, "llm") == revision and selector(em, "llm-preview") == revision
    assert stable_selects_routers(em, "llm")  # nothing serves yet: no revision to fall back to
    assert em.find("poddisruptionbudgets", NAMESPACE, "llm") is not None
    metrics = em.find("services", NAMESPACE, "llm-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert metrics["metadata"]["annotations"]["prometheus.io/scrape"] == "true"  # no ServiceMonitor CRD here
    assert isvc_status(em, "llm")["phase"] == "Deploying"

    assert await deploy_ready(api, em, "llm") == revision
    status = isvc_status(em, "llm")
    assert status["activeRevision"] == revision and "candidateRevision" not in status
    assert condition(em, "llm", "Ready")["status"] == "True"
    assert status["engineConfig"]["maxNumSeqs"] == 256
    await eventually(
        lambda: {"PhaseDeploying", "PhaseReady", "Promoted"} <= set(event_reasons(em, "llm")),
        what="Events for each transition",
    )

    # A second pass over an unchanged cluster writes nothing.
    children = [
        ("deployments", f"llm-{revision}"),
        ("services", "llm"),
        ("services", "llm-preview"),
        ("configmaps", f"llm-{revision}"),
        ("poddisruptionbudgets", "llm"),
    ]
    await wait_passes(em, "llm", 2)  # the Events and kopf's bookkeeping of the promotion settle
    versions = {c: em.find(c[0], NAMESPACE, c[1])["metadata"]["resourceVersion"] for c in children}
    writes, requests = len(em.writes), len(em.requests)
    passes = await wait_passes(em, "llm", 5)
    assert {c: em.find(c[0], NAMESPACE, c[1])["metadata"]["resourceVersion"] for c in children} == versions
    ours = [w[:2] for w in em.writes[writes:] if set(w[2] or {}) != {"metadata"}]  # kopf's bookkeeping aside
    assert ours == []
    # A quiet pass asks the API server one thing: the InferenceService, read fresh. Its children come from
    # the watch-fed indexes (before them: 12.4 requests per pass, discovery included).
    asked = [(m, p) for m, p, q in em.requests[requests:] if "watch=" not in q and not p.endswith("/events")]
    assert len(asked) <= passes + 1, asked

    # Drift is repaired: a deleted child comes back, a hand-edited selector is put back.
    await api.delete(f"/api/v1/namespaces/{NAMESPACE}/services/llm-preview")
    await api.patch(
        f"/api/v1/namespaces/{NAMESPACE}/services/llm",
        json={"spec": {"selector": {"app.kubernetes.io/component": "bogus"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    await eventually(lambda: em.find("services", NAMESPACE, "llm-preview"), what="deleted Service recreated")
    await eventually(lambda: stable_selects_routers(em, "llm"), what="selector repaired")
    # The API server reported the hand edit as a field another manager owns; the operator said so and took it.
    await eventually(lambda: "FieldConflict" in event_reasons(em, "llm"), what="a FieldConflict Event")
    managers = {e["manager"] for e in em.find("services", NAMESPACE, "llm")["metadata"]["managedFields"]}
    assert managers == {"kvpilot"}


async def test_invalid_spec_sets_condition_and_creates_nothing(emulator, start_operator, api):
    em, _ = emulator
    em.validation = False  # an API server that does not enforce the CRD's schema lets it through
    start_operator()
    await create(api, isvc("bad", engine={"gpuMemoryUtilization": 1.5}, model={"uri": "s3://bucket/llm"}))
    ready = await eventually(lambda: condition(em, "bad", "Ready"), what="Ready condition")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.engine.gpuMemoryUtilization" in ready["message"]
    assert "spec.model.uri" in ready["message"]  # every problem is listed, not just the first
    assert isvc_status(em, "bad")["phase"] == "Failed"
    await eventually(lambda: "InvalidSpec" in event_reasons(em, "bad"), what="InvalidSpec Event")
    await wait_passes(em, "bad", 5)
    assert event_reasons(em, "bad").count("InvalidSpec") == 1  # not repeated by every resync
    assert not deployment_names(em)
    assert not em.all("services", NAMESPACE) and not em.all("configmaps", NAMESPACE)


async def test_deleting_the_inference_service_removes_its_children(emulator, start_operator, api):
    em, _ = emulator
    start_operator()
    await create(api, isvc("gone"))
    await deploy_ready(api, em, "gone")
    assert deployment_names(em) and em.all("services", NAMESPACE)
    response = await api.delete(f"{ISVC_PATH}/gone")
    assert response.status_code == 200, response.text
    await eventually(
        lambda: not deployment_names(em),
        what="Deployments gone",
        detail=lambda: f"{em.find('inferenceservices', NAMESPACE, 'gone')}\n{em.writes[-6:]}",
    )
    assert not em.all("services", NAMESPACE)
    assert not em.all("configmaps", NAMESPACE)
    assert not em.all("poddisruptionbudgets", NAMESPACE)


async def test_conflicts_are_retried(emulator, start_operator, api):
    em, _ = emulator
    em.inject_conflicts("PATCH", "deployments", 2)  # the apply, then the forced apply: retried by kopf
    em.inject_conflicts("PATCH", "services", 1)
    em.inject_conflicts("PATCH", "inferenceservices", 2, subresource="status")
    start_operator()
    await create(api, isvc("busy"))
    revision = await deploy_ready(api, em, "busy")
    assert em.find("deployments", NAMESPACE, f"busy-{revision}") is not None
    assert serving(em, "busy") == revision
    served = em.conflicts_served
    assert served.count(("PATCH", "deployments", None)) == 2
    assert served.count(("PATCH", "services", None)) == 1
    assert served.count(("PATCH", "inferenceservices", "status")) == 2


async def test_live_slo_is_read_from_prometheus(emulator, start_operator, api, operator_config):
    em, _ = emulator
    prometheus = FakePrometheus({"time_to_first_token": "0.25", "inter_token": "0.08", "generation_tokens": "900"})
    operator_config.allowed_prometheus_urls.append(prometheus.url)  # an admin's allow-list
    em.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        kind="ServiceMonitor", namespaced=True, verbs=["list", "get", "create", "patch", "delete"]
    )
    try:
        start_operator()
        await create(
            api, isvc("llm", slo={"ttftP95Ms": 500, "itlP95Ms": 50}, monitoring={"prometheusUrl": prometheus.url})
        )
        revision = await deploy_ready(api, em, "llm")
        slo_met = await eventually(
            lambda: (condition(em, "llm", "SLOMet") or {}).get("status") == "False" and condition(em, "llm", "SLOMet"),
            what="SLOMet evaluated",
        )
        assert slo_met["reason"] == "SLOViolated" and "ITL p95 80.0 ms > 50.0 ms" in slo_met["message"]
        status = isvc_status(em, "llm")
        assert status["ttftP95Ms"] == 250.0 and status["tokensPerSecond"] == 900.0  # printer columns
        assert status["slo"]["revision"] == revision
        assert any(f'{{inferenceservice="llm",namespace="default",revision="{revision}"}}' in q
                   for q in prometheus.queries)
        # With the Prometheus operator's CRD present: a ServiceMonitor, and no scrape annotations.
        monitor = em.find("servicemonitors", NAMESPACE, "llm")
        assert monitor["spec"]["selector"]["matchLabels"]["kvpilot.dev/role"] == "metrics"
        annotations = em.find("services", NAMESPACE, "llm-metrics")["metadata"]["annotations"]
        assert not [a for a in annotations if a.startswith("prometheus.io/")]
    finally:
        prometheus.close()


async def test_an_inference_service_may_not_mount_the_node(emulator, start_operator, api):
    """Before: `hostpath:////` became a Deployment mounting the node's root (and its /etc/kubernetes/pki)."""
    em, _ = emulator
    start_operator()
    await create(api, isvc("root", model={"name": "m", "uri": "hostpath:////"}))
    ready = await eventually(lambda: condition(em, "root", "Ready"), what="Ready condition")
    assert (ready["status"], ready["reason"]) == ("False", "PolicyViolation")
    assert "hostpath:// models are off" in ready["message"]
    await wait_passes(em, "root", 3)
    assert not deployment_names(em) and not em.all("services", NAMESPACE)
    assert event_reasons(em, "root").count("PolicyViolation") == 1
