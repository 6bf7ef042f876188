"""Measuring what anti-aliasing does: shift consistency, synthetic data, checkpoints of evaluated models."""
