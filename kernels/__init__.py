"""Triton kernels, one file per fused op (kernel + launcher). Imported lazily by sdalign_rt.ops.

On machines without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported), which is how the test suite checks them against sdalign_rt.reference.
"""
