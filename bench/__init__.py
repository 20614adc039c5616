"""Benchmarks (not tests): model ceiling, serving, ingestion vs a naive baseline, memory, training.

    python -m bench [--quick]      # everything, as `make bench` runs it; figures in BENCHMARKS.md
"""
