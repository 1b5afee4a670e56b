"""Benchmarks run by `make bench` (not tests, not part of the installed package)."""
