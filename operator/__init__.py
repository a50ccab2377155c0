"""kvpilot.operator."""
