"""`kvpilot crd`: print (or write) the InferenceService CRD generated from the pydantic models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpilot.operator.crd import crd_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0
