"""Will a run fit? Memory estimates checked before any work, so a size that cannot fit fails in one line at once
instead of minutes later with a MemoryError (or the machine swapping)."""
from __future__ import annotations

import os

from kl_estimation.core.validation import check_int


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get now (Linux MemAvailable; else physical memory); None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def check_memory(need: float, flag: str, what: str, available: int | None = None) -> None:
    """ValueError naming `flag` when `need` bytes (an estimate of the run's peak) exceed the memory available."""
    have = available_memory() if available is None else available
    if have is not None and need > have:
        raise ValueError(f"{flag}: {what} needs about {human(need)} of memory; {human(have)} is available — "
                         f"lower `{flag}`")


def set_threads(n: int | None) -> int:
    """torch's CPU threads: `n`, or by default the cores not already busy (the 1-minute load average), at least one
    — two processes on 2 cores with torch's default of one thread per core each ran 10× slower per step than with
    one thread each. Returns the number set."""
    import torch

    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
        n = max(1, min(cores, cores - busy))
    else:
        check_int("threads", n, 1)
    torch.set_num_threads(n)
    return n
