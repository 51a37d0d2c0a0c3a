"""Backends of the Buffer: ``torch`` (collectives) and ``nvshmem`` (native kernels)."""
