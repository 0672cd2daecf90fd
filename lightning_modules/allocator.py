"""The process's C allocator policy: freed memory kept for reuse (timings and training alike)."""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters
KEPT_BLOCK_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> str:
    """Have the C allocator reuse freed memory instead of faulting fresh pages in on every call;
    returns the policy in force. Process-wide, applied once.

    glibc serves every block above its mmap threshold (adaptive, at most 32 MiB) with fresh pages
    and unmaps it on free, so a pass's large activations (a 32 x 256 x 1536 fp32 FFN tensor is
    50 MB) fault in page by page on every call. On spam_assassin's 256-token inputs that cost the
    stock model a fifth of its inference time and training a quarter of its step time (README
    "Measured"); worse for comparisons, a pruned model whose smaller tensors fall under the
    threshold escaped it, so measured speedups came out inflated (ACC SC 0.8: 2.39x, 2.14x with
    memory kept). Raising the mmap and trim thresholds to 1 GiB keeps freed blocks for reuse,
    as tcmalloc or jemalloc would."""
    if platform.libc_ver()[0] != "glibc":
        return "system default"
    libc = ctypes.CDLL(None)
    if all(libc.mallopt(option, KEPT_BLOCK_BYTES) == 1 for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)):
        return "glibc, freed memory kept (mmap and trim thresholds 1 GiB)"
    return "glibc default"
