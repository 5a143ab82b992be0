"""Benchmarks of the task service against references measured in the same run: ``make bench``."""
