"""API key: /v1/* needs the bearer key; probes and metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest
from kvpilot.engine.server.app import ServerOptions

from tests.server.conftest import serve

KEY = "s3cret-key"


def test_api_key_required_on_v1_only() -> None:
    with serve(options=ServerOptions(api_key=KEY)) as own:
        body = {"model": "demo", "prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(f"{own.url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{own.url}/v1/models").status_code == 401
        ok = httpx.post(f"{own.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        for probe in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{own.url}{probe}").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{own.url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{own.url}/v1", api_key=KEY, max_retries=0)
        assert client.models.list().data[0].id == "demo"
