"""Where sdaccel keeps what it builds once (compiled artifacts, the CLIP tokenizer, file hashes).

A bottom-layer module (imports nothing of the package), so the engine and the compile cache can
both ask for the same root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_ENV = "SDACCEL_CACHE_DIR"


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """$SDACCEL_CACHE_DIR, else the platform's per-user cache directory + sdaccel."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "sdaccel" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sdaccel"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdaccel"
