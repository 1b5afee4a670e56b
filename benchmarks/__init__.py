"""Benchmarks run by `make bench` (not tests, not part of the installed package)."""

import os

# What `import segexp` sets, but before torch is imported (bench.py imports torch first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
