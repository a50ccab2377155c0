"""One declaration per knob: EngineConfig's fields are `kvpilot serve`'s flags, the CRD's `spec.engine` and the
pod arguments. The operator never imports the engine's runtime; these tests hold the pieces together."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from kvpilot.engine.config import EngineConfig
from kvpilot.engine.flags import engine_values
from kvpilot.engine.server import cli as serve_cli
from kvpilot.operator import resources as res
from kvpilot.operator.engine_knobs import ENGINE_ONLY, effective_knobs, knob_names
from kvpilot.operator.spec import EngineSpec, SearchSpaceSpec, parse_spec
from kvpilot.tuner.space import cpu_space, gpu_space

from .conftest import BASE_SPEC
from .schema import crd_schema


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser


def test_engine_args_parse_with_the_engine_cli_into_the_knobs_the_spec_declares():
    spec = parse_spec({**BASE_SPEC, "model": {"name": "org/model:v1", "uri": "demo"}, "engine": {
        "maxModelLen": 1024, "enablePrefixCaching": False, "drainTimeoutSeconds": 12, "blockSize": 32,
        "dtype": "float32", "extraArgs": ["--seed", "3"]}})
    argv = res.engine_args(spec, "abc123", "demo")
    assert all(a.startswith("--") for a in argv[:-2])  # each flag and its value one argument
    args = _serve_parser().parse_args(argv)
    assert args.port == res.PORT and args.host == "0.0.0.0" and args.drain_timeout == 12
    config = EngineConfig(**engine_values(args))
    assert (config.model, config.revision, config.served_model_name) == ("demo", "abc123", "org/model:v1")
    knobs = config.model_dump(include=set(knob_names()))
    assert knobs == {**effective_knobs(spec.engine), "seed": 3}  # extraArgs come last and win


def test_every_engine_field_is_a_crd_knob_or_set_by_the_operator():
    crd_engine = crd_schema()["properties"]["spec"]["properties"]["engine"]["properties"]
    for name, info in EngineConfig.model_fields.items():
        assert info.description, f"EngineConfig.{name} needs a description (flag help, kubectl explain)"
        camel = EngineSpec.model_fields[name].alias if name in EngineSpec.model_fields else None
        assert (name in ENGINE_ONLY) != (camel in crd_engine), name
    assert set(ENGINE_ONLY) <= set(EngineConfig.model_fields)


def test_search_spaces_name_engine_knobs_and_the_crd_can_override_each():
    for space in (gpu_space(4), cpu_space(512)):
        assert {k.name for k in space.knobs} <= set(knob_names())
    assert set(SearchSpaceSpec.model_fields) == {k.name for k in gpu_space().knobs}


# A knob the lead adds later: EngineConfig grows a field and nothing else is edited.
ADDED_KNOB = """
import json, sys, contextlib, io
from pydantic import Field, create_model
import kvpilot.engine.config as config

config.EngineConfig = create_model(
    "EngineConfig", __base__=config.EngineConfig,
    num_speculative_tokens=(int | None, Field(default=None, ge=0, description="draft tokens per step")),
)
from kvpilot.cli import main
from kvpilot.operator import resources
from kvpilot.operator.crd import crd_manifest
from kvpilot.operator.spec import parse_spec

help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    main(["serve", "--help"])
schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
engine = schema["properties"]["spec"]["properties"]["engine"]["properties"]
spec = parse_spec({"model": {"name": "m", "uri": "demo"}, "engine": {"numSpeculativeTokens": 4}})
print(json.dumps({"help": help_text.getvalue(), "crd": engine.get("numSpeculativeTokens"),
                  "args": resources.engine_args(spec, "r1", "demo")}))
"""


def test_a_knob_added_to_engine_config_reaches_serve_help_the_crd_and_the_pod():
    out = subprocess.run([sys.executable, "-c", ADDED_KNOB], capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    assert "--num-speculative-tokens" in found["help"] and "draft tokens per step" in found["help"]
    assert found["crd"] == {"type": "integer", "minimum": 0, "description": "draft tokens per step"}
    assert "--num-speculative-tokens=4" in found["args"]
