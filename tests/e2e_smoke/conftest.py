"""The e2e harness's pieces against its own API server, on the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest

from e2e.apiserver import ApiServer
from e2e.kube import Kube


@pytest.fixture()
async def kube() -> AsyncIterator[Kube]:
    api = ApiServer()
    api.setup()
    async with api, kmock.Server(api) as server:
        client = Kube(str(server.url).rstrip("/"), "default")
        yield client
        await client.close()
