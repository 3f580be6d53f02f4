"""Benchmarks: prefill speed and memory, and decoding-time compression."""
