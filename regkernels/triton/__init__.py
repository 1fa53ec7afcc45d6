"""Triton kernels, one module per op family (``regkernels.triton.gram``: docs/gram.md).

This package is import-guarded: importing ``regkernels.triton`` never needs Triton. Only
the family modules import ``triton``; ``regkernels.ops`` imports them when a Triton
backend is requested and ``regkernels._ext.has_triton()`` says Triton is installed.
"""
