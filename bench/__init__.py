"""Side-by-side benchmarks and profiling harnesses: python -m bench.<name>."""
