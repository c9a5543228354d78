"""Reading the experiments' TOML files: known tables and one profile, checked."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

__all__ = ["read_profiled"]


def read_profiled(path: str | Path, tables: tuple[str, ...], profile: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the file's top-level tables, a copy of its ``[profiles.<profile>]``).

    Raises ValueError for a table outside ``tables`` and ``profiles`` (a typo must not
    silently fall back to a default) and for a missing profile, naming what is allowed.
    """
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    bad = set(cfg) - set(tables) - {"profiles"}
    if bad:
        expected = ", ".join(f"[{t}]" for t in tables)
        raise ValueError(f"{path}: unknown table(s) {sorted(bad)}; expected {expected}, [profiles.*]")
    profiles = cfg.get("profiles", {})
    if profile not in profiles:
        raise ValueError(f"{path}: no profile {profile!r}; profiles: {sorted(profiles)}")
    return cfg, dict(profiles[profile])
