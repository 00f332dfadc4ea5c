"""Performance suite of the fused runtime: run with `python -m bench.perf` (see __main__.py)."""
