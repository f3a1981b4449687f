"""Baselines the fused operators are compared with (not part of the installed package)."""
