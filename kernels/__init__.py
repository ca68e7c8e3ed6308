"""Triton kernels, one file per family (installed as internvl_engine.kernels). Each file holds `_<op>_kernel`
(@triton.jit) and a launcher with the op's contract signature (docs/ARCHITECTURE.md, "The kernel contract")."""
