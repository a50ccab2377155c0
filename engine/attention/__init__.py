"""kvpilot.engine.attention."""
