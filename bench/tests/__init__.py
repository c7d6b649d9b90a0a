"""Unit tests of the benchmark suite's pure parts (run with the others: see
pyproject's testpaths)."""
