"""kvpilot.kernels."""
