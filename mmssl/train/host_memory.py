"""Keep freed host memory in the process for reuse (`train.keep_host_memory`).

On the CPU every tensor of a step (activations, gradients, temporaries) is a fresh
`malloc`.  glibc serves large blocks with `mmap` and hands freed memory back to the kernel,
so the next step touches new pages and page-faults on each 4 KiB: 19,000-43,000 faults per
bf16 ViT-S/16 step (112 px, batch 32), most of them inside the elementwise kernels (GELU,
LayerNorm) that first write each new output.  Kept, a step took 1.13-1.25x less time in
three runs on an idle machine, but 0.83x in another (`bench/RESULTS.md`, 2026-12-05).  Raising glibc's
mmap and trim thresholds keeps freed blocks in the heap, and later steps reuse them: no
faults after the first step.  The CUDA caching allocator does the same on a GPU; PyTorch's
own CPU launcher (`torch.backends.xeon.run_cpu`) gets it by preloading jemalloc or tcmalloc.

The cost is that the process's resident memory stays at its peak rather than falling
between steps.  The setting is process-wide.  Off glibc (no `mallopt`, or one refusing
the values, as musl's does) or under a preloaded allocator (jemalloc, tcmalloc: they keep
memory their own way) `keep_freed_memory` returns False and changes nothing.
Measured by `bench/bench_host_memory.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (4 * 1024 * 1024 * sizeof(long)): blocks above it
# are still mapped, and unmapped when freed
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free heap top (a C int)


def _libc() -> ctypes.CDLL | None:
    """The C library, if its malloc is the process's (not one that LD_PRELOAD put first,
    such as jemalloc or tcmalloc: glibc's mallopt would not tune it)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        process = ctypes.CDLL(None)  # the global symbol lookup, as a call to malloc resolves
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    address = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    return libc if ctypes.cast(process.malloc, ctypes.c_void_p).value == address else None


_KEPT = False  # set once this process's malloc keeps freed memory


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB in the heap; returns whether it took
    (False off glibc or under another malloc, and nothing is changed then)."""
    global _KEPT
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 for a parameter or value it refuses (musl: always 0)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _KEPT = _KEPT or ok
    return ok


def kept() -> bool:
    """Whether a `keep_freed_memory` call of this process took.  There is no undoing it:
    glibc has no call that reads its thresholds back, and setting one ends its dynamic mmap
    threshold for good."""
    return _KEPT
