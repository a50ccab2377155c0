"""`kvpilot operator`: run the kopf operator in cluster, or out of cluster through KUBECONFIG."""

from __future__ import annotations

import argparse
import asyncio

import kopf
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.main import build_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        help="watch this namespace (repeatable); default: all (env KVPILOT_NAMESPACES)",
    )
    parser.add_argument("--resync-seconds", type=float, help="reconcile interval (env KVPILOT_RESYNC_SECONDS)")
    parser.add_argument(
        "--service-url-template",
        help="how to reach a Service, e.g. http://{name}.{namespace}.svc:{port} (env KVPILOT_SERVICE_URL_TEMPLATE)",
    )
    parser.add_argument(
        "--scrape-interval-seconds", type=float,
        help="Prometheus's scrape interval, for reading tuning trials (env KVPILOT_SCRAPE_INTERVAL_SECONDS)",
    )
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint")
    parser.add_argument(
        "--peering", action="store_true", help="coordinate replicas through kopf peering (needs kopf's peering CRDs)"
    )


def run(args: argparse.Namespace) -> int:
    config = OperatorConfig.from_env(
        namespaces=args.namespaces, resync_seconds=args.resync_seconds, service_url_template=args.service_url_template,
        scrape_interval_seconds=args.scrape_interval_seconds,
    )
    registry = build_registry(config)
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            standalone=not args.peering,
            liveness_endpoint=args.liveness,
        )
    )
    return 0
