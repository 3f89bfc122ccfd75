"""Registry of the Triton kernel implementations (filled in by the kernel modules)."""

# Set to True once the Triton kernels of this package are importable.
AVAILABLE = False
