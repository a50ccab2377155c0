from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml
from kvpilot.operator.config import OperatorConfig

from .emulator import Emulator
from .harness import OperatorThread, PodDouble

NAMESPACE = "default"
ISVC_PATH = f"/apis/kvpilot.dev/v1alpha1/namespaces/{NAMESPACE}/inferenceservices"

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "demo", "uri": "demo", "revision": "r1"},
    "engine": {"image": "kvpilot/engine:test", "drainTimeoutSeconds": 5},
    "resources": {"gpusPerReplica": 0, "cpu": "2", "memory": "4Gi"},
    "replicas": 1,
    "rollout": {"readyTimeoutSeconds": 3, "scaleDownDelaySeconds": 1, "verify": {"timeoutSeconds": 2}},
}


def isvc(name: str, **overrides: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "kvpilot.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


@pytest.fixture()
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    em = Emulator()
    em.setup()
    async with em, kmock.Server(em) as server:
        yield em, str(server.url).rstrip("/")


@pytest.fixture()
def kubeconfig(emulator: tuple[Emulator, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _, url = emulator
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emu",
                "clusters": [{"name": "emu", "cluster": {"server": url}}],
                "users": [{"name": "emu", "user": {"token": "test"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu", "namespace": NAMESPACE}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@pytest.fixture()
def pods() -> Iterator[PodDouble]:
    with PodDouble() as double:
        yield double


@pytest.fixture()
def operator_config(pods: PodDouble) -> OperatorConfig:
    return OperatorConfig(resync_seconds=0.2, service_url_template=pods.url_template)


@pytest.fixture()
async def start_operator(kubeconfig: Path, operator_config: OperatorConfig) -> AsyncIterator[Any]:
    started: list[OperatorThread] = []

    def start() -> OperatorThread:
        op = OperatorThread(operator_config).start()
        started.append(op)
        return op

    yield start
    for op in started:
        if op.thread.is_alive():
            await op.stop()


@pytest.fixture()
async def api(emulator: tuple[Emulator, str]) -> AsyncIterator[httpx.AsyncClient]:
    """The test's own API client (as kubectl would be), on the test's event loop."""
    async with httpx.AsyncClient(base_url=emulator[1], timeout=10) as client:
        yield client
