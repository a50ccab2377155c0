"""Blue-green through the real kopf operator: promotion, rollback (timeout, failed smoke), restart mid-rollout."""

from __future__ import annotations

from .conftest import NAMESPACE, isvc
from .emulator import Emulator
from .flows import (
    condition,
    create,
    deploy_ready,
    deployment_names,
    event_reasons,
    isvc_status,
    mark_ready,
    patch_spec,
    selector,
    serving,
)
from .harness import OperatorProcess, eventually, wait_passes


def stable_selectors(em: Emulator, name: str) -> list[str]:
    """Every revision the routers were ever sent to (the engines Service), in order, without repeats."""
    seen: list[str] = []
    for version in em.versions("services", NAMESPACE, f"{name}-engines"):
        revision = version["spec"]["selector"]["kvpilot.dev/revision"]
        if not seen or seen[-1] != revision:
            seen.append(revision)
    return seen


async def start_upgrade(api, em: Emulator, name: str) -> tuple[str, str]:
    old = await deploy_ready(api, em, name)
    await patch_spec(api, name, {"model": {"revision": "r2"}})
    new = await eventually(lambda: isvc_status(em, name).get("candidateRevision"), what="candidate revision")
    assert new != old
    await eventually(lambda: f"{name}-{new}" in deployment_names(em), what="candidate Deployment")
    await eventually(lambda: selector(em, f"{name}-preview") == new, what="preview selects the candidate")
    assert isvc_status(em, name)["phase"] == "Upgrading"
    assert serving(em, name) == old
    return old, new


async def test_upgrade_promotes_then_retires_the_old_revision(emulator, start_operator, api, pods):
    em, _ = emulator
    start_operator()
    await create(api, isvc("llm", rollout={"readyTimeoutSeconds": 30, "scaleDownDelaySeconds": 3}))
    old, new = await start_upgrade(api, em, "llm")
    await wait_passes(em, "llm", 3)
    assert serving(em, "llm") == old  # a candidate that is not ready takes no traffic

    # The spec has moved on, yet the serving revision is still repaired: rebuilt from its ConfigMap.
    old_deployment = em.find("deployments", NAMESPACE, f"llm-{old}")
    await api.delete(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/llm-{old}")
    rebuilt = await eventually(lambda: em.find("deployments", NAMESPACE, f"llm-{old}"), what="old revision rebuilt")
    assert rebuilt["spec"]["template"] == old_deployment["spec"]["template"]
    await mark_ready(api, em, f"llm-{old}")

    await mark_ready(api, em, f"llm-{new}")
    await eventually(lambda: serving(em, "llm") == new, what="stable Service switched")
    await eventually(lambda: isvc_status(em, "llm").get("activeRevision") == new, what="status promoted")
    assert [service for service, _ in pods.calls] == ["llm-preview"]  # the smoke test went through preview
    assert pods.calls[0][1]["model"] == "demo"
    status = isvc_status(em, "llm")
    assert status["activeRevision"] == new and status["phase"] == "Ready"
    assert f"llm-{old}" in deployment_names(em)  # kept for scaleDownDelaySeconds
    assert [r["revision"] for r in status["retiring"]] == [old]

    await eventually(lambda: deployment_names(em) == {f"llm-{new}", "llm-router"}, what="old revision deleted")
    await eventually(lambda: em.find("configmaps", NAMESPACE, f"llm-{old}") is None, what="old ConfigMap deleted")
    assert stable_selectors(em, "llm") == [old, new]
    history = isvc_status(em, "llm")["history"]
    assert [(h["revision"], h["result"]) for h in history] == [(old, "Promoted"), (new, "Promoted")]
    await eventually(
        lambda: (
            {"RolloutStarted", "CandidateReady", "SmokeTestPassed", "Promoted", "Retired"}
            <= set(event_reasons(em, "llm"))
        ),
        what="rollout Events",
    )


async def test_candidate_never_ready_is_rolled_back(emulator, start_operator, api, pods):
    em, _ = emulator
    start_operator()
    await create(api, isvc("llm"))
    old, new = await start_upgrade(api, em, "llm")
    await eventually(lambda: isvc_status(em, "llm").get("failedRevision") == new, timeout=10, what="rollback")
    progressing = condition(em, "llm", "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "ReadyTimeout"
    assert condition(em, "llm", "Degraded")["reason"] == "RolledBackReadyTimeout"
    assert isvc_status(em, "llm")["phase"] == "Degraded"
    await eventually(lambda: deployment_names(em) == {f"llm-{old}", "llm-router"}, what="candidate removed")
    await eventually(lambda: selector(em, "llm-preview") == old, what="preview back on the active revision")
    await eventually(lambda: "RolledBack" in event_reasons(em, "llm"), what="RolledBack Event")
    assert stable_selectors(em, "llm") == [old]  # traffic never left the old revision
    assert pods.calls == []
    await wait_passes(em, "llm", 5)
    # A failed revision is not retried until the spec changes.
    assert deployment_names(em) == {f"llm-{old}", "llm-router"}


async def test_failed_smoke_test_is_rolled_back(emulator, start_operator, api, pods):
    em, _ = emulator
    pods.healthy["llm-preview"] = False
    start_operator()
    await create(api, isvc("llm"))
    old, new = await start_upgrade(api, em, "llm")
    await mark_ready(api, em, f"llm-{new}")
    await eventually(lambda: isvc_status(em, "llm").get("failedRevision") == new, what="rollback")
    assert condition(em, "llm", "Progressing")["reason"] == "SmokeTestFailed"
    assert "HTTP 503" in condition(em, "llm", "Progressing")["message"]
    assert len(pods.calls) == 3  # SMOKE_ATTEMPTS
    await eventually(lambda: deployment_names(em) == {f"llm-{old}", "llm-router"}, what="candidate removed")
    assert stable_selectors(em, "llm") == [old]


async def test_operator_restarted_mid_rollout_completes_it(emulator, start_operator, api, pods):
    em, _ = emulator
    first = start_operator()
    await create(api, isvc("llm", rollout={"readyTimeoutSeconds": 30, "scaleDownDelaySeconds": 1}))
    old, new = await start_upgrade(api, em, "llm")
    await first.stop()

    await mark_ready(api, em, f"llm-{new}")  # the candidate becomes ready while no operator runs
    assert serving(em, "llm") == old and isvc_status(em, "llm")["rollout"]["step"] == "Deploying"

    start_operator()
    await eventually(lambda: isvc_status(em, "llm").get("activeRevision") == new, what="promotion by the new operator")
    await eventually(lambda: deployment_names(em) == {f"llm-{new}", "llm-router"}, what="old revision deleted")
    assert stable_selectors(em, "llm") == [old, new]
    assert isvc_status(em, "llm")["phase"] == "Ready"


async def test_operator_process_killed_mid_rollout_resumes(emulator, kubeconfig, operator_config, api, tmp_path):
    """The CLI entry point as a real process, SIGKILLed mid-rollout: the next process finishes the job."""
    em, _ = emulator
    log = tmp_path / "operator.log"
    first = OperatorProcess(operator_config, log).start()
    try:
        await create(api, isvc("llm", rollout={"readyTimeoutSeconds": 60, "scaleDownDelaySeconds": 1}))
        old, new = await start_upgrade(api, em, "llm")
    finally:
        await first.kill()
    await mark_ready(api, em, f"llm-{new}")
    second = OperatorProcess(operator_config, log).start()
    try:
        await eventually(
            lambda: isvc_status(em, "llm").get("activeRevision") == new,
            timeout=30,
            what=f"promotion by the restarted process; log:\n{log.read_text()[-2000:]}",
        )
        await eventually(lambda: deployment_names(em) == {f"llm-{new}", "llm-router"}, what="old revision deleted")
        assert stable_selectors(em, "llm") == [old, new]
    finally:
        await second.kill()
