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


@pytest.mark.parametrize("env", [{"KVPILOT_API_KEY": ""}, {}])
def test_an_empty_api_key_is_an_error_not_open_access(env: dict[str, str]) -> None:
    """`KVPILOT_API_KEY=""` (a Secret with an empty value, say) used to turn authentication off silently."""
    import os
    import subprocess
    import sys

    args = [] if env else ["--api-key", ""]
    environ = {k: v for k, v in os.environ.items() if k != "KVPILOT_API_KEY"} | env
    done = subprocess.run([sys.executable, "-m", "kvpilot", "serve", "--model", "demo", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, env=environ)
    assert done.returncode == 2, done.stderr
    assert "api_key" in done.stderr
