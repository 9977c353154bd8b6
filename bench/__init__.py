"""Benchmarks side by side with the peers (`make bench`, `python -m bench.run`); see bench/README.md."""
