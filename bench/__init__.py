"""Throughput and quality benchmarks (``saferclip-data bench ...``): measured figures, never tests."""
