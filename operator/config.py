"""Operator-wide settings (not per InferenceService): from flags, else environment, else defaults."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

DEFAULT_SERVICE_URL_TEMPLATE = "http://{name}.{namespace}.svc:{port}"
DEFAULT_ROUTER_IMAGE = "ghcr.io/kvpilot/kvpilot-router:0.1.0"


class OperatorConfig(BaseModel):
    resync_seconds: float = Field(default=10.0, gt=0, description="How often each InferenceService is reconciled.")
    service_url_template: str = Field(
        default=DEFAULT_SERVICE_URL_TEMPLATE,
        description="How the operator reaches a Service ({name}, {namespace}, {port}); tests and the e2e "
        "harness point it at a local proxy.",
    )
    slo_refresh_seconds: float = Field(default=30.0, gt=0, description="How often the live SLO is read.")
    autoscale_refresh_seconds: float = Field(default=5.0, gt=0, description="How often the autoscaler reads its "
                                             "signal (spec.autoscaling).")
    slo_window_seconds: float = Field(default=300.0, gt=0, description="Window of the live SLO reading.")
    scrape_interval_seconds: float = Field(
        default=15.0, gt=0, description="Prometheus's scrape interval: trial windows are read a scrape after they end."
    )
    namespaces: list[str] = Field(default_factory=list, description="Watched namespaces; empty: cluster-wide.")
    allowed_host_paths: list[str] = Field(
        default_factory=list, description="Node directories hostpath:// models may mount (prefixes); empty: none."
    )
    allowed_image_registries: list[str] = Field(
        default_factory=list, description="Image prefixes engine and load pods may run, e.g. ghcr.io/kvpilot/; "
        "empty: any image."
    )
    prometheus_url: str | None = Field(
        default=None, pattern=r"^https?://.+", description="The Prometheus every InferenceService is measured with."
    )
    allowed_prometheus_urls: list[str] = Field(
        default_factory=list, description="Other Prometheus URLs an InferenceService may name in "
        "spec.monitoring.prometheusUrl; a URL not listed is refused."
    )
    prometheus_ca_bundle: str | None = Field(default=None, description="CA bundle for an https Prometheus.")
    router_image: str = Field(
        default=DEFAULT_ROUTER_IMAGE, min_length=1, description="The image every InferenceService's routers run "
        "(docker/Dockerfile.router): the operator's choice, not the spec's, so it is trusted as the operator is."
    )
    read_secrets: bool = Field(
        default=False, description="Whether engine.apiKeySecret is honoured (the operator reads the Secret, which "
        "must carry the label kvpilot.dev/api-key=true)."
    )

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorConfig:
        env = {
            "resync_seconds": os.environ.get("KVPILOT_RESYNC_SECONDS"),
            "service_url_template": os.environ.get("KVPILOT_SERVICE_URL_TEMPLATE"),
            "slo_refresh_seconds": os.environ.get("KVPILOT_SLO_REFRESH_SECONDS"),
            "slo_window_seconds": os.environ.get("KVPILOT_SLO_WINDOW_SECONDS"),
            "autoscale_refresh_seconds": os.environ.get("KVPILOT_AUTOSCALE_REFRESH_SECONDS"),
            "scrape_interval_seconds": os.environ.get("KVPILOT_SCRAPE_INTERVAL_SECONDS"),
            "namespaces": _listed("KVPILOT_NAMESPACES"),
            "allowed_host_paths": _listed("KVPILOT_ALLOWED_HOST_PATHS"),
            "allowed_image_registries": _listed("KVPILOT_ALLOWED_IMAGE_REGISTRIES"),
            "prometheus_url": os.environ.get("KVPILOT_PROMETHEUS_URL"),
            "allowed_prometheus_urls": _listed("KVPILOT_ALLOWED_PROMETHEUS_URLS"),
            "prometheus_ca_bundle": os.environ.get("KVPILOT_PROMETHEUS_CA_BUNDLE"),
            "read_secrets": os.environ.get("KVPILOT_READ_SECRETS"),
            "router_image": os.environ.get("KVPILOT_ROUTER_IMAGE"),
        }
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def service_url(self, name: str, namespace: str, port: int) -> str:
        return self.service_url_template.format(name=name, namespace=namespace, port=port).rstrip("/")


def _listed(variable: str) -> list[str] | None:
    return [item for item in os.environ.get(variable, "").split(",") if item] or None
