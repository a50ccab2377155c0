"""One declaration of the router's knobs: every field is a flag, and `to_args` gives the same config back."""

from __future__ import annotations

import argparse
import subprocess
import sys

from kvpilot.router.config import RouterConfig, add_flags, from_args, to_args


def _parse(argv: list[str]) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args(parser.parse_args(argv))


def test_every_field_is_a_flag_with_its_description() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(RouterConfig.model_fields)
    assert all(flags[name].help == field.description for name, field in RouterConfig.model_fields.items())


def test_to_args_round_trips() -> None:
    config = RouterConfig(backend=["http://a:8000", "http://b:8000"], load_factor=1.5, k8s_port=9000,
                          tokenizer="/models/x", queue_timeout_s=2.5)
    assert _parse(to_args(config)) == config
    assert _parse([]) == RouterConfig()
    assert to_args(RouterConfig()) == []
    assert to_args(RouterConfig(), always=("host", "port")) == ["--host=0.0.0.0", "--port=8080"]


def test_bad_settings_exit_2_with_the_reason() -> None:
    cases = [([], "either as --backend URLs or through --k8s-service"),
             (["--backend", "nonsense"], "must look like http://host:port"),
             (["--backend", "http://a:1", "--load-factor", "0.5"], "load_factor"),
             (["--backend", "http://a:1", "--tokenizer", "/nonexistent"], "no tokenizer.json")]
    for argv, message in cases:
        out = subprocess.run([sys.executable, "-m", "kvpilot", "router", *argv], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and message in out.stderr, (argv, out.stderr)
