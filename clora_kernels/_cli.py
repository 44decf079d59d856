"""What every command line of the package shares: its help formatter, argument types that refuse
bad values with one line and argparse's exit code 2 (naming the value and the allowed range), and
the check that an output path can be written, made before any work starts."""
from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile

import torch

from ._io import special_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help names its own default or there is
    none to show (it printed "(default: on) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def device(choice: str) -> torch.device:
    """--device auto / cuda / cpu as a torch.device (auto: CUDA when torch sees a GPU). Asking for
    cuda without one is a ValueError in the CLIs' 'argument --flag: ...' form."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("argument --device: cuda, but torch sees no CUDA GPU")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def dtype_name(name, device: torch.device) -> str:
    """--dtype, defaulting to bf16 on a GPU and fp32 on CPU (where skinny bf16 matmuls are slow)."""
    return name or ("bf16" if device.type == "cuda" else "fp32")


_REGEX_CHARS = set("^$*+?()[]{}|\\")


def target_modules(values):
    """--targets as inject_clora takes it: names (a list, the suffix rule), or one value that is
    'all-linear' or a regex (it holds one of ^$*+?()[]{}|\\) as a string; None stays None."""
    if values is not None and len(values) == 1 and (values[0].lower() == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return values


TARGETS_HELP = ("inject_clora's target_modules: layer names (a name matches a layer's full name or its last "
                "components), or one regex on the full name, or 'all-linear'")


def positive_int(text):
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def non_negative_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


def positive_float(text):
    v = float(text)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def non_negative(text):
    v = float(text)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def fraction(text):
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def seed(text):
    v = int(text)
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return v


def check_output(ap: argparse.ArgumentParser, flag: str, path, folder_ok: bool = False) -> None:
    """Before the work starts: an output file's folder exists and is writable, or can be made (its
    nearest existing folder is writable; the writer makes it, `_io.parent_made`, so that a refused
    run leaves no folder behind), and no name on the way is longer than the file system takes (a file
    written through a temporary one, `_io.write_atomic`, gets one that fits); with folder_ok, `path` is
    that folder."""
    if path is None:
        return
    if not path:        # (--json "" was taken, and the run wrote nothing)
        ap.error(f"argument {flag}: the path is empty")
    if os.path.isdir(path) and not folder_ok:
        ap.error(f"argument {flag}: {path!r} is a folder; give a file name")
    if not folder_ok and os.fspath(path).endswith(tuple(filter(None, (os.sep, os.altsep)))):
        # (a missing folder's name with its slash became a file of that name; `keep.json/` replaced keep.json)
        ap.error(f"argument {flag}: {path!r} ends with a separator, a folder's name; give a file name")
    if not folder_ok:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            st = None
        if st is not None and not stat.S_ISCHR(st.st_mode) and any(os.path.samestat(st, own)
                                                                   for own in _own_streams()):
            # (/dev/stdout: a pipe got a document per write, among the table's lines; a file it is redirected
            # to was replaced, and what the command printed went to the replaced one. A device, /dev/null or a
            # terminal, is written into)
            ap.error(f"argument {flag}: {path!r} is this command's own output, where it prints; give a file")
        if st is not None and stat.S_ISSOCK(st.st_mode):
            ap.error(f"argument {flag}: {path!r} is a socket; give a file")
        if special_file(path):      # (a device or a named pipe, written into: its folder is not written)
            if not os.access(path, os.W_OK):
                ap.error(f"argument {flag}: {path!r} is not writable")
            return
    folder = os.path.abspath(path if folder_ok else os.path.dirname(os.path.abspath(path)))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        ap.error(f"argument {flag}: cannot create the folder {folder!r} ({existing!r} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        ap.error(f"argument {flag}: the folder {existing!r} is not writable")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    names = os.path.relpath(os.path.abspath(path), existing).split(os.sep)     # every name still to be made
    long = [n for n in names if len(os.fsencode(n)) > name_max]
    if long:
        ap.error(f"argument {flag}: the name {long[0][:40]!r}... is longer than this file system's {name_max} bytes")
    # a file made and removed in the nearest existing folder: one that takes none (/proc) passed the tests above
    # and failed after the work
    try:
        handle, probe = tempfile.mkstemp(prefix=".clora-probe", dir=existing)
    except OSError as exc:
        ap.error(f"argument {flag}: the folder {existing!r} takes no new file ({exc.strerror})")
    os.close(handle)
    try:
        os.remove(probe)
    except OSError:     # (a folder that takes files but lets none be removed: the write goes on, the probe stays)
        pass


def _own_streams() -> list:
    """The stat of this process's standard output and error, where they are open."""
    out = []
    for fd in (1, 2):
        try:
            out.append(os.fstat(fd))
        except OSError:
            pass
    return out


def check_distinct(ap: argparse.ArgumentParser, *outputs) -> None:
    """That no two of the (flag, path) outputs given name one file (--json X --plot X: the plot
    replaced the results, without a word)."""
    seen = {}
    for flag, path in outputs:
        if path:
            real = os.path.realpath(path)
            if real in seen:
                ap.error(f"argument {flag}: {path!r} is the file {seen[real]} writes too")
            seen[real] = flag


def check_plot(ap: argparse.ArgumentParser, flag: str, path) -> None:
    """check_output for a plot, and that it names a format matplotlib writes, before the work starts
    rather than after it."""
    check_output(ap, flag, path)
    if not path:
        return
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:      # (the run did its work, printed its table, then failed on the import)
        ap.error(f"argument {flag}: writing a plot needs matplotlib ({exc}): pip install matplotlib, or leave "
                 f"{flag} out")
    ext = os.path.splitext(path)[1][1:].lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    if not ext:         # (matplotlib would write PATH.png, which no message names)
        ap.error(f"argument {flag}: {path!r} has no extension; name the format (e.g. {path}.png)")
    if ext not in kinds:
        ap.error(f"argument {flag}: matplotlib cannot write a .{ext} file (it writes {', '.join(sorted(kinds))})")
