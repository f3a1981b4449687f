"""Benchmarks of contrastmask_ops: fused operators vs the pure-PyTorch reference vs a per-ROI pipeline.

Run `python -m benchmarks.run --help` from the repository root.
"""
