"""Small helpers shared by the CLIs and the caches."""
from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shlex
import stat
import sys
import threading


def parent_made(path: str) -> str:
    """`path`, its folder made where missing (the CLIs check only that it can be: a refused run
    leaves no folder behind)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def check_path(path, what: str, name: str = "path") -> None:
    """A TypeError naming `what`'s argument where `path` is no str or os.PathLike (None reached
    os.stat's own message, which named neither)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: {name} must be a str or os.PathLike, got {type(path).__name__}")
    if os.fspath(path) in ("", b""):    # (a save wrote its temporary file into the folder above, then failed on it)
        raise ValueError(f"{what}: {name} is empty")


def _tmp_suffix() -> str:
    """The suffix of `write_atomic`'s temporary name: this process and thread."""
    return f".{os.getpid()}.{threading.get_ident()}.tmp"


def _tmp_path(path: str) -> str:
    """`write_atomic`'s temporary file for `path` (its folder exists): NAME + `_tmp_suffix()`, or, where
    that is longer than the file system's names (a legal name of 230-255 bytes failed at its first
    write), the name cut short and a hash of the whole name in its place, so two names cut alike differ."""
    folder, name = os.path.split(path)
    suffix = _tmp_suffix()
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(name + suffix)) > name_max:
        digest = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
        keep = os.fsencode(name)[:max(0, name_max - len(suffix) - len(digest))]
        name = keep.decode("utf-8", "ignore") + digest      # (no character cut in two)
    return os.path.join(folder, name + suffix)


def special_file(path) -> bool:
    """Whether `path` (a link followed) is a device or a named pipe (/dev/null), which `write_atomic`
    writes into, never replaces (a pipe's reader gets one document per write)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def write_atomic(path, write) -> None:
    """`write(tmp)` into a temporary file beside `path` (its folder made where missing), then an atomic
    rename: a reader, or a run interrupted mid-write (a killed torchrun rank, Ctrl-C), never sees a
    half-written file; the previous complete file stays until replaced. The temporary name holds the
    process and thread: two writers of the same path do not share it (`_tmp_path`). A symlink is written through (its
    target replaced), and a replaced file keeps its permissions, as a write in place kept them. A device
    or a named pipe (`special_file`) is written into: replaced, root's --json /dev/null became a file."""
    if special_file(path):
        write(os.fspath(path))
        return
    path = os.path.realpath(path)
    tmp = _tmp_path(parent_made(path))
    try:
        write(tmp)
        if os.path.exists(path):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors_atomic(path, tensors: dict, metadata=None) -> None:
    """Write a safetensors file atomically (`write_atomic`): the bytes made in memory, then written by
    open(). Not safetensors' save_file, which writes a temporary file of its own and renames it over
    the path: a device, a named pipe or a link to one (`save_adapter(m, "/dev/null")` as root) was
    replaced by a plain file, and a new file had mode 0600 where open() gives the umask's."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)

    def dump(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    write_atomic(path, dump)


def write_json_atomic(path, data) -> None:
    """Write JSON atomically (`write_atomic`)."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    write_atomic(path, dump)


def cache_dir(*parts: str) -> str:
    """$CLORA_CACHE_DIR (default ~/.cache/clora_kernels), joined with parts."""
    root = os.environ.get("CLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clora_kernels")
    return os.path.join(root, *parts)


def _commit() -> str | None:
    """The git commit of this package's checkout (with '+dirty' where files differ from it), None where
    it is not a git checkout (an installed wheel) or git is missing."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=here,
                                 capture_output=True, text=True, timeout=10)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if tracked.returncode or sha.returncode:        # (a copy inside some other repository's tree: not ours)
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def provenance(prog: str, argv=None, distributions=()) -> dict:
    """What every result file is stamped with: UTC date, the command line (`argv`, default the
    process's), torch's thread count (clora_soft's numbers depend on it), the version of this package
    and its git commit (`_commit`), and the versions of python, torch, triton, peft, timm, torchvision,
    transformers and numpy, and of the installed `distributions` (data or model packages, by their
    PyPI names; None where not installed)."""
    from importlib import metadata

    import torch

    from . import __version__
    argv = sys.argv[1:] if argv is None else list(argv)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join([prog] + argv),       # (quoted: it runs again as written)
           "clora_kernels": __version__, "commit": _commit(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    modules = ("triton", "peft", "timm", "torchvision", "transformers", "numpy")
    for name in modules + tuple(distributions):
        try:        # (the installed distribution's version: nothing is imported for it)
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
            try:        # a module another distribution installs (nightly and ROCm torch: pytorch-triton)
                if name in modules and importlib.util.find_spec(name) is not None:
                    out[name] = getattr(importlib.import_module(name), "__version__", None)
            except Exception:
                pass
    return out


def read_safetensors(path, check=None) -> tuple:
    """(tensors, metadata) of the safetensors file `path`; check(metadata), where given, runs before
    any tensor is read (a foreign file is refused without reading it whole). A ValueError naming the
    path where it is a folder or not a readable safetensors file (truncated, or another format); a
    missing file is the FileNotFoundError it is."""
    from safetensors import safe_open
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a safetensors file")
    try:
        handle = safe_open(str(path), framework="pt")
        metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if check is not None:
        check(metadata)
    try:
        return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
