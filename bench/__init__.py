"""The benchmarks: run them from the repository root as `python -m bench.NAME` (bench/harness.py)."""
