"""Peak memory of a step, a guard that makes allocations past a budget fail fast,
and the test of whether an error was running out of memory.

GPU: the caching allocator's counters (``max_memory_allocated``, reset just
before the step). CPU: the process's peak RSS (``VmHWM``, reset through
/proc/self/clear_refs after glibc's malloc_trim gave cached heap back).
"""

from __future__ import annotations

import gc

import torch

from benchmarks import common

MIB = 2**20


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in bytes beyond the start."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            common.malloc_trim()
            self.base = common.rss_mib() * MIB
            common.reset_peak_rss()

    def stop(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return common.rss_mib("VmHWM") * MIB - self.base


def guard_memory(device: str, budget_mib: float | None) -> None:
    """Make allocations past about ``budget_mib`` (beyond what is held now) fail at once,
    instead of running a case that cannot fit (or swapping a shared machine).
    CPU: RLIMIT_AS at the current address space + the budget + slack (address
    space runs ahead of resident memory); GPU: the caching allocator's memory fraction.
    The fit itself is judged on the measured peak, not on this guard."""
    if not budget_mib:
        return
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        limit = torch.cuda.memory_reserved() + budget_mib * MIB * 1.25 + 512 * MIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        return
    import resource

    vm = common.rss_mib("VmSize") * MIB
    limit = int(vm + budget_mib * MIB * 1.25 + 512 * MIB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text or "Cannot allocate memory" in text
