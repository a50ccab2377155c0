"""`kvpilot operator` and `kvpilot crd` parse their flags; settings come from flags, then environment."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kvpilot.operator.config import OperatorConfig


def test_operator_help_lists_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot", "operator", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--namespace", "--resync-seconds", "--service-url-template", "--liveness"):
        assert flag in out


def test_operator_config_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KVPILOT_SERVICE_URL_TEMPLATE", "http://127.0.0.1:9000/{namespace}/{name}")
    monkeypatch.setenv("KVPILOT_NAMESPACES", "a,b")
    monkeypatch.setenv("KVPILOT_RESYNC_SECONDS", "3")
    config = OperatorConfig.from_env(resync_seconds=1.5)
    assert config.resync_seconds == 1.5 and config.namespaces == ["a", "b"]
    assert config.service_url("llm-preview", "ns", 8000) == "http://127.0.0.1:9000/ns/llm-preview"
    assert OperatorConfig().service_url("llm", "ns", 8000) == "http://llm.ns.svc:8000"
    monkeypatch.setenv("KVPILOT_RESYNC_SECONDS", "soon")
    with pytest.raises(ValueError, match="resync_seconds"):
        OperatorConfig.from_env()
