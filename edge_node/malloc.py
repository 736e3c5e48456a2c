"""How freed memory goes back to the OS. Torch-free, so the light processes (the agent daemon, the CLI's
parser) set it without loading the model runtime."""

from __future__ import annotations

import ctypes


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes and up from their own mappings (glibc M_MMAP_THRESHOLD), so a
    freed weight or temporary goes back to the OS at once.

    glibc's default threshold adapts upward when big blocks are freed; later weight-sized tensors then come
    from the heap, whose holes are never returned: loading SmolLM2-135M (513 MiB of float32) peaked at 1.25x
    its weights over the post-import RSS that way, 1.04x with this set. Returns False where it is not glibc.
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (AttributeError, OSError):
        return False
