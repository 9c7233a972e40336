"""Benchmarks: `python -m bench` (or `make bench`) writes bench/results/aggregation.md."""
