"""Triton kernels of magicpig, shipped inside the package as ``magicpig.kernels``."""
