"""Shared fixtures: a per-session cache directory so the demo model is built once per test run."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("KVPILOT_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kvpilot-test-cache"))
