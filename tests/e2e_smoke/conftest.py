"""`e2e` is a folder of the repository run with `python -m e2e`, not an installed package: import it from the root."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after the standard library, so its `operator` is never shadowed
