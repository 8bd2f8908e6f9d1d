"""Benchmarks that print figures; see bench/RESULTS.md."""
