"""The local node's Job controller against the e2e API server: real `kvpilot bench serve` processes, one
attempt each, with the Pod and Job status a cluster would show (about 10 s on 2 cores)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

from e2e.jobs import JobController
from e2e.kube import ApiError, Kube
from e2e.node import Node


@pytest.fixture()
async def node(kube: Kube, tmp_path: Path) -> AsyncIterator[tuple[Node, JobController]]:
    """The Deployment node beside the Job controller: it must leave the Job pods alone."""
    deployments = Node(kube, tmp_path, 0.2, lambda runners: None)
    jobs = JobController(kube, tmp_path, period_s=0.1)
    deployments.start()
    jobs.start()
    yield deployments, jobs
    await jobs.stop()
    await deployments.stop()


@pytest.fixture()
async def openai() -> AsyncIterator[str]:
    """Just enough of the OpenAI API for `bench serve`: one model, one-token streams; /stall/... never answers."""
    stop = asyncio.Event()

    async def models(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"data": [{"id": "m", "vocab_size": 100}]})

    async def completions(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        usage = {"prompt_tokens": 2, "completion_tokens": 1}
        for chunk in ({"choices": [{"text": "x"}]}, {"choices": [], "usage": usage}):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def stall(_: aiohttp.web.Request) -> aiohttp.web.Response:
        await stop.wait()
        return aiohttp.web.Response(status=503)

    app = aiohttp.web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_route("*", "/stall/{tail:.*}", stall)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    stop.set()
    await runner.cleanup()


def job(name: str, args: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "load", "image": "kvpilot-engine", "command": ["kvpilot"], "args": args}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"kvpilot.dev/revision": "trial-0"}},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": {"kvpilot.dev/role": "load"}},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2, "containers": [container]},
            },
        },
    }


def bench(url: str, *extra: str) -> list[str]:
    return ["bench", "serve", "--url", url, "--num-prompts", "2", "--request-rate", "inf", "--input-len", "2", "2",
            "--output-len", "1", "1", "--timeout", "30", "--no-progress", *extra]  # fmt: skip


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
    return value


async def finished(kube: Kube, name: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status = ((await kube.get("Job", name)) or {}).get("status") or {}
        return status if status.get("conditions") else None

    return await until(check)


async def pods_of(kube: Kube, name: str) -> list[dict[str, Any]]:
    return await kube.list("Pod", {"batch.kubernetes.io/job-name": name})


async def test_job_pod_runs_once_and_reports_its_termination_message(
    kube: Kube, node: tuple[Node, JobController], openai: str
) -> None:
    created = await kube.create("Job", job("ok", bench(openai, "--output=/dev/termination-log")))
    uid = created["metadata"]["uid"]
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    status = await finished(kube, "ok")
    assert status["succeeded"] == 1 and "failed" not in status and "active" not in status
    assert status["ready"] == 0 and status["startTime"] <= status["completionTime"]
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Complete", "True", "CompletionsReached")
    ]
    [pod] = await pods_of(kube, "ok")
    meta = pod["metadata"]
    assert meta["name"].startswith("ok-") and len(meta["name"]) == len("ok-") + 5
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "ok", "uid": uid}
    assert meta["ownerReferences"] == [{**owner, "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"]["kvpilot.dev/role"] == "load"
    assert meta["labels"]["job-name"] == "ok" and meta["labels"]["controller-uid"] == uid
    assert pod["status"]["phase"] == "Succeeded"
    [container] = pod["status"]["containerStatuses"]
    terminated = container["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["startedAt"] <= terminated["finishedAt"]
    assert '"completed": 2' in terminated["message"] and len(terminated["message"].encode()) <= 4096
    deployments, _ = node
    assert not deployments.runners and await kube.get("Pod", meta["name"]) is not None


async def test_failure_deadline_and_deletion_stop_the_process(
    kube: Kube, node: tuple[Node, JobController], openai: str
) -> None:
    _, jobs = node
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    await kube.create("Job", job("bad", ["bench", "serve"], container=fallback))
    await kube.create("Job", job("slow", bench(openai + "/stall"), activeDeadlineSeconds=3))
    await kube.create("Job", job("gone", bench(openai + "/stall")))
    [gone] = await until(lambda: pods_of(kube, "gone"))
    gone_runner = await until(lambda: _running(jobs, gone["metadata"]["name"]))
    await until(lambda: _job_active(kube, "gone"))

    bad = await finished(kube, "bad")
    assert bad["failed"] == 1 and "succeeded" not in bad and "completionTime" not in bad
    assert [(c["type"], c["reason"]) for c in bad["conditions"]] == [("Failed", "BackoffLimitExceeded")]
    [pod] = await pods_of(kube, "bad")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed" and terminated["reason"] == "Error" and terminated["exitCode"] == 2
    assert "required: --url" in terminated["message"]  # the log's tail: nothing was written to the file

    [slow_pod] = await pods_of(kube, "slow")
    slow_runner = jobs.runners[slow_pod["metadata"]["name"]]
    slow = await finished(kube, "slow")
    assert slow["failed"] == 1 and [(c["type"], c["reason"]) for c in slow["conditions"]] == [
        ("Failed", "DeadlineExceeded")
    ]
    await until(lambda: _true(slow_runner.terminated is not None))
    assert slow_runner.terminated.exit_code == 143  # type: ignore[union-attr]  # SIGTERM, within its grace
    assert await pods_of(kube, "slow") == []  # the real controller deletes the active pods

    assert await kube.delete("Job", "gone")  # Background, as kubectl: the pod goes with it
    assert await kube.get("Pod", gone["metadata"]["name"]) is None
    await until(lambda: _true(gone_runner.terminated is not None))
    assert not jobs.runners.get(gone["metadata"]["name"]) and not node[0].runners


async def _running(jobs: JobController, pod: str) -> Any:
    runner = jobs.runners.get(pod)
    return runner if runner is not None and runner.running else None


async def _job_active(kube: Kube, name: str) -> bool:
    status = ((await kube.get("Job", name)) or {}).get("status") or {}
    return status.get("active") == 1 and status.get("ready") == 1


async def _true(value: bool) -> bool:
    return value


async def test_job_api_defaults_immutability_and_orphaning(kube: Kube) -> None:
    created = await kube.create("Job", job("j", ["--help"], suspend=True))
    spec = created["spec"]
    assert spec["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "j"
    assert spec["completions"] == 1 and spec["backoffLimit"] == 0  # as given; unset ones defaulted
    with pytest.raises(ApiError, match="422"):
        await kube.patch("Job", "j", {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}})
    await kube.patch("Job", "j", {"spec": {"suspend": False, "activeDeadlineSeconds": 5}})
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": created["metadata"]["uid"], "controller": True}
    await kube.create("Pod", {"metadata": {"name": "j-abcde", "ownerReferences": [ref]}, "spec": {}})
    response = await kube.http.delete("/apis/batch/v1/namespaces/default/jobs/j")  # no propagationPolicy
    assert response.status_code == 200
    orphan = await kube.get("Pod", "j-abcde")
    assert orphan is not None and "ownerReferences" not in orphan["metadata"]
