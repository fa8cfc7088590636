"""Run the Triton kernels on the CPU through Triton's interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
