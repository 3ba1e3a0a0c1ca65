"""Benchmarks: each compares alternatives side by side in one run and writes JSON plus a markdown table."""
