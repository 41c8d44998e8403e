"""Peak memory of a block of work, for benchmarks: the rise of allocated CUDA memory, or of resident memory.

On CUDA the allocator's own peak counter is used. On CPU the kernel's high-water mark of resident memory
(``VmHWM``) is reset on entry (``/proc/self/clear_refs``, Linux 4.0+) and read on exit, so the peak is
exact however short it lasts; where that is not possible a thread samples resident memory every 2 ms.
Freed heap pages are handed back to the system first (``malloc_trim``, glibc), so memory a previous
block freed but the allocator kept does not hide this block's rise.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current resident size; ``False`` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        match = re.search(r"VmHWM:\s+(\d+) kB", fh.read())
    if match is None:
        raise OSError("/proc/self/status has no VmHWM line")
    return int(match.group(1)) * 1024


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


class PeakMemory:
    """Largest rise of memory while the block runs, in bytes (``.bytes``) or GiB (``.gib``).

    Args:
        device: ``"cuda"`` measures the CUDA allocator (allocated tensors only); anything else measures
            this process's resident memory.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.start = self.peak = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = self.peak = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = resident_bytes()
        if not _reset_high_water_mark():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())
        else:
            self.peak = max(self.peak, _high_water_mark())

    @property
    def bytes(self) -> int:
        """The rise: peak minus the amount at entry."""
        return max(0, self.peak - self.start)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    @property
    def gib(self) -> float:
        return self.bytes / 2**30
