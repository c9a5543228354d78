"""How much memory this process may still fill: what decides whether the prefix cache stays in RAM."""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_memory"]


def _read_words(path: str) -> list[str]:
    try:
        return Path(path).read_text().split()
    except OSError:
        return []


def available_memory() -> int | None:
    """Bytes this process may still fill (None when unknown): /proc/meminfo's MemAvailable,
    lowered to the room left under a cgroup (v2 or v1) memory limit when one is set.

    The cgroup usage counts the page cache too, so under a limit this errs low (the
    cache then goes to disk earlier than needed, never into an out-of-memory kill).
    """
    meminfo = _read_words("/proc/meminfo")
    found = [int(meminfo[i + 1]) * 1024 for i, w in enumerate(meminfo[:-1]) if w == "MemAvailable:"]
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        cap, used = _read_words(limit)[:1], _read_words(usage)[:1]
        # cgroup v2 writes "no limit" as "max", v1 as about 2^63
        if cap and used and cap[0].isdigit() and used[0].isdigit() and int(cap[0]) < 1 << 60:
            found.append(max(0, int(cap[0]) - int(used[0])))
    return min(found) if found else None
