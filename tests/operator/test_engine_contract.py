"""The pods' command line must parse with the engine's own `kvpilot serve` parser (the operator never
imports the engine; this test holds the two together)."""

from __future__ import annotations

import argparse

from kvpilot.engine.server import cli as serve_cli
from kvpilot.operator import resources as res
from kvpilot.operator.spec import parse_spec

from .conftest import BASE_SPEC


def test_engine_args_parse_with_the_engine_cli():
    spec = parse_spec(
        {
            **BASE_SPEC,
            "engine": {
                "maxModelLen": 1024,
                "enablePrefixCaching": False,
                "drainTimeoutSeconds": 12,
                "extraArgs": ["--seed", "3"],
            },
        }
    )
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(res.engine_args(spec, "abc123", "demo"))
    assert args.model == "demo" and args.revision == "abc123" and args.served_model_name == "demo"
    assert args.port == res.PORT and args.host == "0.0.0.0"
    assert args.max_model_len == 1024 and args.enable_prefix_caching is False
    assert args.drain_timeout == 12 and args.seed == 3
    assert args.gpu_memory_utilization == 0.9 and args.max_num_seqs == 256 and args.tensor_parallel_size == 1
