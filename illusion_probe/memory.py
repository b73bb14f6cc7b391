"""Give freed heap memory back to the operating system during long CPU loops.

PyTorch's CPU tensors come from ``malloc``. glibc raises its mmap threshold as large
blocks are freed, after which tensors of a few MB come from the heap, and a loop of
differently sized temporaries fragments it: measured here, evaluating the Dyck paper
preset grew by about 100 MB per batch until the kernel killed it at 22 GB.
``malloc_trim(0)`` hands the free pages back, but trimming after every batch costs
time too: the next batch faults the same pages in again (measured: evaluation of the
quick preset 28.0 s with a trim per batch against 25.4 s without). So
:class:`HeapTrimmer` trims only once resident memory has grown by a set amount.
Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

DEFAULT_SLACK_BYTES = 256 << 20


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc``); ``None`` where unknown."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Call between iterations: trims the heap when resident memory grew ``slack_bytes`` since the last trim."""

    def __init__(self, slack_bytes: int = DEFAULT_SLACK_BYTES):
        self.slack_bytes = slack_bytes
        self.trims = 0
        self._baseline = resident_bytes()
        self._trim = _malloc_trim() if self._baseline is not None else None

    def __call__(self) -> None:
        if self._trim is None:
            return
        rss = resident_bytes()
        if rss is not None and rss - self._baseline > self.slack_bytes:
            self._trim(0)
            self.trims += 1
            self._baseline = resident_bytes() or rss
