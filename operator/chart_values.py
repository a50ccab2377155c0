"""The Helm chart's values, as a pydantic model: charts/kvpilot/values.schema.json is generated from it.

Regenerate with `python -m kvpilot.operator.chart_values > charts/kvpilot/values.schema.json`;
a test fails when the file and the model disagree.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Image(_Values):
    repository: str = Field(default="ghcr.io/kvpilot/kvpilot-operator", min_length=1)
    tag: str = Field(default="", description="Defaults to the chart's appVersion.")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class RouterImage(_Values):
    repository: str = Field(default="ghcr.io/kvpilot/kvpilot-router", min_length=1)
    tag: str = Field(default="", description="Defaults to the chart's appVersion.")


class RouterValues(_Values):
    image: RouterImage = Field(default_factory=RouterImage)


class Crds(_Values):
    install: bool = True


class PrometheusValues(_Values):
    url: str = Field(default="", description="The Prometheus every InferenceService is measured with.")
    allowedUrls: list[str] = Field(
        default_factory=list, description="Other URLs an InferenceService may name in spec.monitoring.prometheusUrl."
    )
    caBundle: str = Field(default="", description="Path of a CA bundle (mounted by you) for an https Prometheus.")


class OperatorValues(_Values):
    watchNamespaces: list[str] = Field(default_factory=list)
    resyncSeconds: float = Field(default=10, gt=0)
    scrapeIntervalSeconds: float = Field(
        default=15, gt=0, description="Prometheus's scrape interval: a trial's window is read a scrape after it ends."
    )
    serviceUrlTemplate: str = Field(default="http://{name}.{namespace}.svc:{port}", pattern=r"\{name\}")
    logLevel: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    allowedHostPaths: list[str] = Field(
        default_factory=list, description="Node directories hostpath:// models may mount; empty: hostPath is off."
    )
    allowedImageRegistries: list[str] = Field(
        default_factory=list, description="Image prefixes InferenceServices may run (ghcr.io/kvpilot/); empty: any."
    )
    prometheus: PrometheusValues = Field(default_factory=PrometheusValues)
    resources: dict[str, Any] = Field(default_factory=dict)
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)


class ServiceAccount(_Values):
    create: bool = True
    name: str = ""
    annotations: dict[str, str] = Field(default_factory=dict)


class Rbac(_Values):
    create: bool = True
    readSecrets: bool = Field(
        default=False, description="Honour engine.apiKeySecret: the operator may read Secrets labelled "
        "kvpilot.dev/api-key=true (namespaced RoleBindings when watchNamespaces is set)."
    )


class ServiceMonitor(_Values):
    enabled: bool = False
    interval: str = Field(default="15s", pattern=r"^[0-9]+(ms|s|m|h)$")
    labels: dict[str, str] = Field(default_factory=dict)


class GrafanaDashboard(_Values):
    enabled: bool = False
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"})


class ChartValues(_Values):
    image: Image = Field(default_factory=Image)
    imagePullSecrets: list[dict[str, str]] = Field(default_factory=list)
    router: RouterValues = Field(default_factory=RouterValues)
    crds: Crds = Field(default_factory=Crds)
    operator: OperatorValues = Field(default_factory=OperatorValues)
    serviceAccount: ServiceAccount = Field(default_factory=ServiceAccount)
    rbac: Rbac = Field(default_factory=Rbac)
    serviceMonitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    grafanaDashboard: GrafanaDashboard = Field(default_factory=GrafanaDashboard)


def values_schema() -> dict[str, Any]:
    schema = ChartValues.model_json_schema()
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = "kvpilot chart values"
    return schema


def values_schema_json() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(values_schema_json(), end="")
