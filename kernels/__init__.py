"""Triton kernels (installed as bevt.kernels)."""
