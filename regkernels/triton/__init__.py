"""Triton kernels, one module per op family or op (``gram``, ``conv_matrix``, ``conv_frame``).

Each module is laid out kernels → launchers → ``torch.library`` custom ops with fakes and
autograd → the entry functions the families' tables name (``regkernels/ops/<family>.py``). This
package itself never needs Triton: the tables import a module only when
``regkernels._ext.has_triton()`` says Triton is installed.
"""
