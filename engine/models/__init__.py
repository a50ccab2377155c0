"""kvpilot.engine.models."""
