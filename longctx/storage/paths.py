"""Where longctx keeps its files: `LONGCTX_HOME`, else the platform's user data directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def longctx_home() -> Path:
    """The root of caches, snapshots and the user config (created on first use)."""
    env = os.environ.get("LONGCTX_HOME")
    home = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("longctx"))
    home.mkdir(parents=True, exist_ok=True)
    return home
