"""Composite implementations (backend ``"torch"``): torch ops with a hand-written backward.

One module per op family (``composite/gram.py``: SRIP; ``composite/conv.py``: the implicit conv
frame statistics and the sparse ``conv_to_matrix``). Device-generic; they import the reference and
``regkernels._geometry`` only, never ``regkernels.ops``.
"""
