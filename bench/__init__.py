"""Side-by-side benchmarks that write BENCHMARKS.md: `python -m bench [--mode quick|full]` (see __main__.py)."""
