"""What an InferenceService may ask of the cluster, as the operator's configuration allows it.

A namespace's InferenceService authors are not the cluster's administrators: a hostPath model mounts the
node (`hostpath:////` is its root), an image runs with whatever the pod may reach, a Prometheus URL is fetched
by the operator (a request forgery if it is anyone's), and an `apiKeySecret` puts a Secret's value into a
pod running that image. Each is allowed only as the operator's configuration (the chart's values) says;
everything else is a violation, reported as `Ready=False, reason PolicyViolation`, and nothing is created.
"""

from __future__ import annotations

import posixpath

from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.tuner.metrics import Prometheus

API_KEY_LABEL = "kvpilot.dev/api-key"  # a Secret carries it ("true") to be usable as engine.apiKeySecret


def _under(path: str, prefixes: list[str]) -> bool:
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return any(normal == p.rstrip("/") or normal.startswith(p.rstrip("/") + "/") for p in prefixes if p)


def violations(spec: InferenceServiceSpec, config: OperatorConfig) -> list[str]:
    """Every way the spec oversteps the configuration, one line each, naming the field."""
    out = []
    uri = spec.model.uri
    if uri.startswith("hostpath://"):
        path = uri.removeprefix("hostpath://")
        if not config.allowed_host_paths:
            out.append("spec.model.uri: hostpath:// models are off (the operator allows no host paths)")
        elif not _under(path, config.allowed_host_paths) or ".." in path.split("/"):
            out.append(f"spec.model.uri: {path} is not under an allowed host path {config.allowed_host_paths}")
    registries = config.allowed_image_registries
    if registries and not any(spec.engine.image.startswith(r) for r in registries):
        out.append(f"spec.engine.image: {spec.engine.image} is not from an allowed registry {registries}")
    url = spec.monitoring.prometheus_url
    if url is not None and url != config.prometheus_url and url not in config.allowed_prometheus_urls:
        out.append("spec.monitoring.prometheusUrl: not one the operator is configured to use (leave it unset for "
                   "the operator's own)")
    if spec.engine.api_key_secret and not config.read_secrets:
        out.append("spec.engine.apiKeySecret: the operator is not allowed to read Secrets (chart: rbac.readSecrets)")
    return out


def secret_violation(name: str, secret: dict | None) -> str | None:
    """An apiKeySecret must exist, hold `api-key` and opt in with the label kvpilot.dev/api-key=true."""
    if secret is None:
        return f"spec.engine.apiKeySecret: Secret {name} not found"
    if ((secret.get("metadata") or {}).get("labels") or {}).get(API_KEY_LABEL) != "true":
        return f"spec.engine.apiKeySecret: Secret {name} lacks the label {API_KEY_LABEL}=true"
    if "api-key" not in (secret.get("data") or {}):
        return f"spec.engine.apiKeySecret: Secret {name} has no api-key entry"
    return None


def prometheus_url(spec: InferenceServiceSpec, config: OperatorConfig) -> str | None:
    """The Prometheus an InferenceService is measured with: its own (once allowed), else the operator's."""
    return spec.monitoring.prometheus_url or config.prometheus_url


def prometheus(spec: InferenceServiceSpec, config: OperatorConfig) -> Prometheus | None:
    url = prometheus_url(spec, config)
    return None if url is None else Prometheus(url, config.prometheus_ca_bundle)
