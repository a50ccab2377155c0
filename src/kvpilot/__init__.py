"""kvpilot: an LLM inference engine and the Kubernetes operator that tunes it against declared SLOs."""

__version__ = "0.1.0"
