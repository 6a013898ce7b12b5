"""Benchmarks printed by the tool itself: ratios against a baseline measured in the same run."""
