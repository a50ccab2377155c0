"""Kernel tests run Triton's CPU interpreter; the variable must be set before triton or the kernels load."""

import os

os.environ["TRITON_INTERPRET"] = "1"
