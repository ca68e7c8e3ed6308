"""The serving process's own metrics under Prometheus' standard names (those its client libraries export), read from
/proc/self on Linux: a server growing in memory, leaking descriptors or spinning shows here.

Elsewhere only what the standard library can read honestly is reported: process_cpu_seconds_total (os.times) and
process_max_fds (resource.getrlimit, where the module exists); the memory, descriptor and start-time series are
absent rather than guessed. Fields of /proc/<pid>/stat and /proc/stat as proc(5) numbers them."""
from __future__ import annotations

import os

try:
    import resource
except ImportError:  # not on Windows
    resource = None

_PROC = "/proc/self"


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT = _boot_time()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat_fields() -> list[str] | None:
    """/proc/self/stat from field 3 (state) on: the command name (field 2) may hold spaces and parentheses, so the
    split starts after its last ')'."""
    try:
        with open(f"{_PROC}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _max_fds() -> int | None:
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def process_metrics() -> list[tuple[str, str, str, float]]:
    """[(type, name, help, value)]."""
    out = []
    fields = _stat_fields()
    if fields is not None:  # field n of proc(5) is fields[n - 3]
        utime, stime, start, vsize, rss = (int(fields[i - 3]) for i in (14, 15, 22, 23, 24))
        out.append(("counter", "process_cpu_seconds_total", "User and system CPU time, seconds.",
                    (utime + stime) / _TICKS))
        out.append(("gauge", "process_virtual_memory_bytes", "Virtual memory size, bytes.", vsize))
        out.append(("gauge", "process_resident_memory_bytes", "Resident memory size, bytes.", rss * _PAGE))
        if _BOOT is not None:
            out.append(("gauge", "process_start_time_seconds", "Start time of the process since the Unix epoch.",
                        _BOOT + start / _TICKS))
    else:
        t = os.times()
        out.append(("counter", "process_cpu_seconds_total", "User and system CPU time, seconds.", t.user + t.system))
    try:
        out.append(("gauge", "process_open_fds", "Open file descriptors.", len(os.listdir(f"{_PROC}/fd"))))
    except OSError:
        pass
    most = _max_fds()
    if most is not None:
        out.append(("gauge", "process_max_fds", "The limit on open file descriptors.", most))
    return out
