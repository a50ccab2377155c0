"""Every knob of the router, declared once: `kvpilot router` flags and pod arguments derive from these fields.

A flag is the field's name with dashes (`--load-factor`); a list field is a repeated flag (`--backend URL`
per engine). `to_args` writes a config back as flags, for whoever deploys one.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

# Blocks of recompute one evicted cached block counts for (picker.py says why 2). Here, not in picker.py, so that
# the operator, which reads RouterConfig, never imports the router's tokenizer.
EVICTION_COST = 2.0


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=8080, ge=1, le=65535, description="port to listen on")

    backend: list[str] = Field(default_factory=list, description="a static engine base URL (repeat per engine)")
    k8s_service: str | None = Field(
        default=None, description="discover engines in Kubernetes: the Service whose selector names the active "
        "revision's pods (its selector switching is the blue-green switch)")
    k8s_namespace: str | None = Field(default=None, description="its namespace (default: the router pod's own)")
    k8s_pod_selector: str | None = Field(
        default=None, description="label selector of the pods to watch, across revisions (default: every pod in "
        "the namespace; the Service's selector then picks among them)")
    k8s_port: int | None = Field(default=None, ge=1, le=65535,
                                 description="engine port on the pods (default: the Service's numeric targetPort)")

    tokenizer: str | None = Field(
        default=None, description="model directory (or 'demo') whose tokenizer and chat template the engines use; "
        "without it text prompts route by their leading characters")
    block_size: int = Field(default=16, ge=1, le=1024,
                            description="tokens per block for consistent hashing, until engines report theirs")
    load_factor: float = Field(
        default=1.25, ge=1.0, le=10.0,
        description="an engine takes affinity traffic while its load stays within this factor of the mean")
    load_slack: int = Field(default=4, ge=0, description="requests an engine may have beyond that bound and still "
                            "take affinity traffic")
    max_waiting_per_engine: int = Field(
        default=8, ge=1, description="an engine with this many requests waiting (by its /metrics) is overloaded")
    max_kv_usage: float = Field(default=0.98, gt=0.0, le=1.0,
                                description="an engine this full of KV with requests waiting is overloaded")
    eviction_cost: float = Field(
        default=EVICTION_COST, ge=0.0, le=100.0,
        description="blocks of recompute one evicted cached block counts for when engines are compared, beside "
        "the blocks each must compute (0: the longest cached prefix always wins)")
    hash_prefix_blocks: int = Field(default=4, ge=1, description="leading blocks that key consistent hashing")
    hash_prefix_chars: int = Field(default=256, ge=1,
                                   description="leading characters that key it when the router cannot tokenize")
    recent_route_ttl_s: float = Field(
        default=10.0, ge=0.0, description="how long a prefix this router just sent counts as cached there "
        "before the engine's own events confirm it")

    max_attempts: int = Field(default=3, ge=1, le=10, description="engines tried per request before the first byte")
    max_queued: int = Field(default=256, ge=0, description="requests held while no engine has room (429 beyond)")
    queue_timeout_s: float = Field(default=30.0, ge=0.0, description="longest a request waits for an engine")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After on the router's own 429 and 503")
    connect_timeout_s: float = Field(default=2.0, gt=0.0, description="connecting to an engine")
    upstream_timeout_s: float = Field(default=600.0, gt=0.0, description="longest silence from an engine mid-request")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="request body limit (413 above)")
    drain_timeout_s: float = Field(default=30.0, ge=0.0, description="on SIGTERM, how long requests may finish")

    scrape_interval_s: float = Field(default=0.5, gt=0.0, description="how often engines' /metrics and /ready are read")
    events_wait_s: float = Field(default=5.0, gt=0.0, le=60.0, description="long-poll of engines' /kv/events")


def _scalar(annotation: Any) -> Any:
    """`int | None` -> int; `list[str]` -> str."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
    return annotation


def add_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in RouterConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        is_list = get_origin(field.annotation) is list
        parser.add_argument(flag, dest=name, type=_scalar(field.annotation), action="append" if is_list else "store",
                            help=field.description)


def from_args(args: argparse.Namespace) -> RouterConfig:
    """Flags left unset keep the field's default (pydantic validates the rest)."""
    given = {name: getattr(args, name) for name in RouterConfig.model_fields if getattr(args, name, None) is not None}
    return RouterConfig(**given)


def to_args(config: RouterConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The flags that give `config` back, for pod arguments: what differs from the defaults, and the fields named
    in `always`. Each flag and its value are one argument (`--name=value`), so a value can never read as a flag."""
    values = config.model_dump()
    chosen = config.model_dump(exclude_defaults=True)
    args: list[str] = []
    for name in RouterConfig.model_fields:
        if name not in chosen and name not in always:
            continue
        flag = "--" + name.replace("_", "-")
        items = values[name] if isinstance(values[name], list) else [values[name]]
        args += [f"{flag}={item}" for item in items]
    return args
