"""Benchmarks: one script per kernel or engine path, sharing benchmarks/harness.py."""
