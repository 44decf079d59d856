"""Small shared I/O helpers."""
from __future__ import annotations

import json
import os


def write_json_atomic(path, data) -> None:
    """Write JSON through a temporary file and an atomic rename: a reader, or a run interrupted
    mid-write, never sees a half-written file; the previous complete file stays until replaced."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
