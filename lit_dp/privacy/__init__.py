"""Differential privacy: sampling, clipping, noise, per-sample gradients and accounting."""
