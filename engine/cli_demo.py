"""`kvpilot demo-model`: build the embedded demo model once and print where it lives."""

from __future__ import annotations

import argparse

from kvpilot.engine.demo import ensure_demo_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command takes no arguments of its own."""


def run(args: argparse.Namespace) -> int:
    print(ensure_demo_model())
    return 0
