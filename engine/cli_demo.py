"""`kvpilot demo-model`: build the embedded demo model once and print where it lives."""

from __future__ import annotations

import argparse

from kvpilot.engine.demo import ensure_demo_model, ensure_demo_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="build only its tokenizer (no torch needed), for the router's image")


def run(args: argparse.Namespace) -> int:
    print(ensure_demo_tokenizer() if args.tokenizer_only else ensure_demo_model())
    return 0
