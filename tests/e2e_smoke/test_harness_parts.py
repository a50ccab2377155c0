"""The e2e harness's own server-side emulation and pod translation, checked in isolation (seconds)."""

from __future__ import annotations

import sys

import pytest

from e2e.kube import Kube
from e2e.pod import container_command


def _deployment(name: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"replicas": 1, "template": {"spec": {}}},
    }


async def test_server_assigns_metadata_and_separates_status(kube: Kube) -> None:
    created = await kube.create("Deployment", _deployment("a"))
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"]
    patched = await kube.patch("Deployment", "a", {"spec": {"replicas": 2}})
    assert patched["metadata"]["generation"] == 2
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    await kube.patch("Deployment", "a", {"status": {"readyReplicas": 2}, "spec": {"replicas": 9}}, sub="status")
    current = await kube.get("Deployment", "a")
    assert current is not None
    assert current["status"] == {"readyReplicas": 2}
    assert current["spec"]["replicas"] == 2 and current["metadata"]["generation"] == 2


async def test_label_selector_and_owner_garbage_collection(kube: Kube) -> None:
    owner = await kube.create("Deployment", _deployment("owner"))
    await kube.create("Deployment", _deployment("other"))
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": owner["metadata"]["uid"]}
    await kube.create("Pod", {"metadata": {"name": "p", "ownerReferences": [ref]}, "spec": {}})
    assert [d["metadata"]["name"] for d in await kube.list("Deployment", {"app": "other"})] == ["other"]
    assert await kube.delete("Deployment", "owner")
    assert await kube.get("Pod", "p") is None


def test_container_command_runs_locally_on_the_given_port() -> None:
    container = {
        "command": ["kvpilot", "serve"],
        "args": ["--model", "/mnt/model/sub", "--host", "0.0.0.0", "--port", "8000"],
        "volumeMounts": [{"name": "model", "mountPath": "/mnt/model"}],
    }
    volumes = [{"name": "model", "hostPath": {"path": "/data/m"}}]
    assert container_command(container, volumes, 1234) == [
        sys.executable,
        "-m",
        "kvpilot",
        "serve",
        "--model",
        "/data/m/sub",
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
    ]
    joined = {**container, "args": ["--model=/mnt/model/sub", "--host=0.0.0.0", "--port=8000", "--no-warmup"]}
    assert container_command(joined, volumes, 1234)[4:] == [
        "--model=/data/m/sub", "--host=127.0.0.1", "--port=1234", "--no-warmup"
    ]
    with pytest.raises(ValueError, match="only `kvpilot"):
        container_command({"command": ["sh"]}, [], 1)
