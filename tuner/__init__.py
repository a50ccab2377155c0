"""kvpilot.tuner: closed-loop tuning of the engine's knobs against SLOs (local `kvpilot tune`, in-cluster driver)."""
