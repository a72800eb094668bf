"""What a stage cost: its peak resident memory (and GPU memory), rows and seconds.

The peak is the process's high-water mark (VmHWM) since the stage began: Linux lets a
process reset it (`/proc/self/clear_refs`, value 5), so each stage of one in-process run
gets its own figure. Where the reset is refused the figure is the process's peak so far
(`peak_rss_scope` says which). GPU memory is torch's peak allocation on the current
device, when the stage used CUDA through torch.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

MIB = 2**20


def status_kib(name: str) -> int:
    """A `VmXXX:` field of /proc/self/status in KiB (0 where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (since the last reset), else getrusage's lifetime peak."""
    kib = status_kib("VmHWM")
    if kib:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """This process's current RSS (0 where /proc is missing)."""
    return status_kib("VmRSS") * 1024


def _torch_cuda():  # type: ignore[no-untyped-def]
    """torch.cuda when torch is already imported and CUDA is initialised (never imports torch itself)."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None
    except Exception:  # a broken CUDA install must not fail a stage's bookkeeping
        return None


@contextmanager
def stage_meter() -> Iterator[dict[str, float | int | str]]:
    """Measure a block: yields a dict that holds, after the block, the resource figures.

    Keys: `peak_rss_mib`, `start_rss_mib`, `peak_rss_scope` ("stage" or "process"),
    `seconds`, and `gpu_peak_mib` when torch used CUDA. The caller adds `rows`.
    """
    out: dict[str, float | int | str] = {}
    scope = "stage" if reset_peak_rss() else "process"
    cuda = _torch_cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    out["start_rss_mib"] = round(rss_bytes() / MIB, 1)
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["peak_rss_mib"] = round(peak_rss_bytes() / MIB, 1)
        out["peak_rss_scope"] = scope
        cuda = _torch_cuda()
        if cuda is not None:
            out["gpu_peak_mib"] = round(cuda.max_memory_allocated() / MIB, 1)


def resource_metadata(figures: dict[str, float | int | str], rows: int) -> dict[str, float | int | str]:
    """The figures as `resources/<name>` metadata entries, with the stage's rows."""
    return {f"resources/{k}": v for k, v in {**figures, "rows": int(rows)}.items()}
