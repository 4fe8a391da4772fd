"""Sparse-attention ops for NSMLA.

Each op lives in its own package (``kernels/<op>/``) with a plain PyTorch ``reference.py``
that is the CPU path and the test oracle for any fast (Triton) implementation.
"""
