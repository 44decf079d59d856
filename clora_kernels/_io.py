"""Small helpers shared by the CLIs and the caches."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def parent_made(path: str) -> str:
    """`path`, its folder made where missing (the CLIs check only that it can be: a refused run
    leaves no folder behind)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_json_atomic(path, data) -> None:
    """Write JSON through a temporary file and an atomic rename: a reader, or a run interrupted
    mid-write, never sees a half-written file; the previous complete file stays until replaced."""
    tmp = f"{parent_made(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def cache_dir(*parts: str) -> str:
    """$CLORA_CACHE_DIR (default ~/.cache/clora_kernels), joined with parts."""
    root = os.environ.get("CLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clora_kernels")
    return os.path.join(root, *parts)


def provenance(prog: str, argv=None) -> dict:
    """What every result file is stamped with: UTC date, the command line (`argv`, default the
    process's), torch's thread count (clora_soft's numbers depend on it) and the versions of python,
    torch, triton, peft and timm (None where not installed)."""
    import torch
    argv = sys.argv[1:] if argv is None else list(argv)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([prog] + argv), "python": platform.python_version(),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    for mod in ("triton", "peft", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out
