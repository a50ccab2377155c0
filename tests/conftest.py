"""Suite-wide settings, applied before any test module imports triton, transformers or the engine."""

from __future__ import annotations

import os
import tempfile

# Build the demo model once per machine for the whole suite.
os.environ.setdefault("KVPILOT_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kvpilot-test-cache"))
# CI has no GPU: Triton kernels run in its CPU interpreter. This must precede the first import of triton,
# which transformers may trigger from any test folder.
os.environ["TRITON_INTERPRET"] = "1"
