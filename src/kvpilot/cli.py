"""The `kvpilot` command: one subcommand per part of the system, each registered by its own module.

Subcommand modules are imported only when chosen, so `kvpilot crd` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-model": ("kvpilot.engine.cli_demo", "build (once) and print the path of the embedded demo model"),
    "generate": ("kvpilot.engine.cli_generate", "generate text offline from a prompt"),
    "serve": ("kvpilot.engine.server.cli", "serve the OpenAI-compatible HTTP API"),
    "bench": ("kvpilot.engine.server.bench_cli", "benchmarks; `kvpilot bench serve` drives load at a server"),
    "operator": ("kvpilot.operator.cli", "run the Kubernetes operator (in cluster or through KUBECONFIG)"),
    "crd": ("kvpilot.operator.cli_crd", "print the InferenceService CRD generated from its models"),
    "tune": ("kvpilot.tuner.cli", "tune the engine's knobs against SLOs on this machine"),
    "router": ("kvpilot.router.cli", "route OpenAI requests across engines by prefix cache, with retries"),
}


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-") and a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvpilot", description="kvpilot: serve, tune and operate LLMs.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
