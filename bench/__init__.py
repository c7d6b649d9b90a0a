"""Benchmark suite: starttls-proxy next to stunnel, nginx mail and the backends.

Run ``scripts/bench.sh`` (or ``python -m bench --help``); see ``docs/benchmarks.md``.
"""
