"""Helpers shared by the benchmarks: machine info, peak memory, GEMM peak, markdown output."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024

# The peak-RSS helpers live in the package (stages report their own peaks): re-exported for the benchmarks.
from semdedup_assets.core.run.meter import reset_peak_rss as reset_peak  # noqa: E402
from semdedup_assets.core.run.meter import status_kib as read_status_kib  # noqa: E402


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's guess."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1/5/15-minute load averages, or n/a."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        return False


def machine_lines(extra: list[str] | None = None) -> list[str]:
    """The '## Machine' section: CPU, cores, memory, library versions, load average."""
    import numpy as np
    import torch

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    gpu = torch.cuda.get_device_name(0) if cuda_available() else "none (CUDA not available)"
    return [
        "## Machine",
        "",
        f"- CPU: {cpu_model()}; cores: {os.cpu_count()} (usable: {usable}); memory: {mem_gib:,.1f} GiB",
        f"- GPU: {gpu}",
        f"- python {platform.python_version()}, torch {torch.__version__} (threads: {torch.get_num_threads()}),"
        f" numpy {np.__version__}, {platform.system()} {platform.release()}",
        f"- load average (1/5/15 min) at start: {load_average()}; above the core count, other processes"
        " share the cores and absolute timings understate the machine (compare ratios within one run only)",
        *(extra or []),
        "",
    ]


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run fn once: its result, wall and CPU seconds, baseline/peak RSS and the extra peak (MiB)."""
    gc.collect()
    baseline_kib = read_status_kib("VmRSS")
    reset_ok = reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kib = read_status_kib("VmHWM")
    return {
        "result": result,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "baseline_mib": baseline_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "extra_mib": (peak_kib - baseline_kib) / 1024,
        "reset_ok": reset_ok,
    }


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The smallest wall time of `repeats` calls (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak_gflops(d: int, rows: int = 4096, repeats: int = 5, device: str = "cpu", dtype: Any = None) -> float:
    """Same-run GEMM peak: best-of-`repeats` GFLOP/s of (rows x d) @ (d x rows)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(rows, d, device=device, dtype=dtype)
    b = torch.randn(d, rows, device=device, dtype=dtype)

    def run() -> None:
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    run()  # warm-up
    return 2.0 * rows * rows * d / best_of(run, repeats) / 1e9


def pairwise_gflops(n: int, d: int, seconds: float) -> float:
    """GFLOP/s counting only the n(n-1)/2 needed dot products of 2*d flops each."""
    return (n * (n - 1) / 2) * 2 * d / seconds / 1e9 if seconds > 0 else float("nan")


class TreeRssSampler:
    """Polls the summed RSS of a process and all its descendants (via /proc) and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        """Start polling `pid` every `interval` seconds in a daemon thread."""
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _children() -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
        return kids

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = self._children()
            todo, total = [self.pid], 0
            while todo:
                p = todo.pop()
                total += self._rss_kib(p)
                todo.extend(kids.get(p, []))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)

    def stop(self) -> float:
        """Stop polling; return the peak in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def run_tree(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command, sampling the peak RSS of its process tree: (rc, seconds, peak MiB, stdout, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeRssSampler(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    return {"rc": proc.returncode, "seconds": seconds, "peak_mib": sampler.stop(), "stdout": out, "stderr": err}


def add_output_options(ap: argparse.ArgumentParser, default_out: str, smoke_help: str) -> None:
    """The --out and --smoke options every benchmark takes."""
    ap.add_argument("--out", default=None, help=f"markdown output (default {default_out}; none with --smoke)")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)


def output_path(args: argparse.Namespace, default_out: str) -> str | None:
    """Where the report goes: --out, else the default file; a smoke run writes none."""
    return args.out if args.out is not None else (None if args.smoke else default_out)


def verdict(met: bool) -> str:
    """'met' or 'MISSED'."""
    return "met" if met else "MISSED"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as a reader would type it."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([".venv/bin/python", script, *args])


def emit(lines: list[str], out_path: str | None) -> None:
    """Print the report and write it to out_path (if any)."""
    report = "\n".join(lines) + "\n"
    print(report)
    if out_path:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"written to {path}")
