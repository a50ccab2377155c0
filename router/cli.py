"""`kvpilot router`: the prefix-cache-aware router in front of kvpilot engines.

SIGTERM stops it taking connections and gives requests in flight `--drain-timeout-s` to finish.
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web
from kvpilot.router.config import RouterConfig, add_flags, from_args
from kvpilot.router.discovery import BackendSource, StaticSource
from pydantic import ValidationError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser)


def _source(config: RouterConfig) -> BackendSource:
    if bool(config.backend) == bool(config.k8s_service):
        raise ValueError("give engines either as --backend URLs or through --k8s-service, not both or neither")
    if config.k8s_service:
        from kvpilot.router.kube_source import KubernetesSource

        return KubernetesSource.from_config(config)
    return StaticSource(config.backend)


def run(args: argparse.Namespace) -> int:
    from kvpilot.router.app import build_app
    from kvpilot.router.tokenizer import PromptTokenizer, resolve_tokenizer_dir

    try:
        config = from_args(args)
        source = _source(config)
        tokenizer = PromptTokenizer(resolve_tokenizer_dir(config.tokenizer)) if config.tokenizer else None
    except (ValidationError, ValueError, OSError) as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if tokenizer is None:
        log.warning("no --tokenizer: token-id prompts route by prefix, text prompts by their leading characters")
    app = build_app(config, source, tokenizer)
    log.info("routing on %s:%d", config.host, config.port)
    web.run_app(app, host=config.host, port=config.port, shutdown_timeout=config.drain_timeout_s,
                handler_cancellation=True, access_log=None, print=None)
    return 0
