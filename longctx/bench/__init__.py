"""Benchmarks run by `longctx bench`: every method on the same items, in one process."""
