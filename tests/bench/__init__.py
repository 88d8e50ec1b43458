"""Benchmarks run by `make bench`: each compares the framework with its baseline in one run."""
