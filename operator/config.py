"""Operator-wide settings (not per InferenceService): from flags, else environment, else defaults."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

DEFAULT_SERVICE_URL_TEMPLATE = "http://{name}.{namespace}.svc:{port}"


class OperatorConfig(BaseModel):
    resync_seconds: float = Field(default=10.0, gt=0, description="How often each InferenceService is reconciled.")
    service_url_template: str = Field(
        default=DEFAULT_SERVICE_URL_TEMPLATE,
        description="How the operator reaches a Service ({name}, {namespace}, {port}); tests and the e2e "
        "harness point it at a local proxy.",
    )
    slo_refresh_seconds: float = Field(default=30.0, gt=0, description="How often the live SLO is read.")
    slo_window_seconds: float = Field(default=300.0, gt=0, description="Window of the live SLO reading.")
    scrape_interval_seconds: float = Field(
        default=15.0, gt=0, description="Prometheus's scrape interval: trial windows are read a scrape after they end."
    )
    namespaces: list[str] = Field(default_factory=list, description="Watched namespaces; empty: cluster-wide.")

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorConfig:
        env = {
            "resync_seconds": os.environ.get("KVPILOT_RESYNC_SECONDS"),
            "service_url_template": os.environ.get("KVPILOT_SERVICE_URL_TEMPLATE"),
            "slo_refresh_seconds": os.environ.get("KVPILOT_SLO_REFRESH_SECONDS"),
            "slo_window_seconds": os.environ.get("KVPILOT_SLO_WINDOW_SECONDS"),
            "scrape_interval_seconds": os.environ.get("KVPILOT_SCRAPE_INTERVAL_SECONDS"),
            "namespaces": [n for n in os.environ.get("KVPILOT_NAMESPACES", "").split(",") if n] or None,
        }
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def service_url(self, name: str, namespace: str, port: int) -> str:
        return self.service_url_template.format(name=name, namespace=namespace, port=port).rstrip("/")
