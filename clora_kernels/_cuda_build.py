"""What the CUDA build of csrc/ targets and where its toolkit is: the one home of these settings
for setup.py (`clora_kernels._C`) and the JIT build (backends/cuda.py). Standard library only, and
no imports from the package: setup.py loads this file by path, without importing clora_kernels or
torch."""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil

DEFAULT_ARCHS = "80;90+PTX"
NVCC_FLAGS = ["-O3"]      # both builds (no --use_fast_math: the binary the tests run is the one users get)
_ARCH = re.compile(r"^(\d{1,2})\.(\d)([a-z]?)(\+PTX)?$|^(\d{1,2})(\d)([a-z]?)(\+PTX)?$")


def cuda_archs(spec=None) -> list:
    """Target compute capabilities, from `spec` or else env CLORA_CUDA_ARCH (';' or ',' separated,
    default "80;90+PTX": sm_80 and sm_90 code, and sm_90's PTX for the driver to compile on newer GPUs),
    as canonical names: "80", "90a", "100", "90+PTX" ("8.6" and "9.0a" are read as torch writes them).
    Raises ValueError naming the entry that is not one."""
    raw = os.environ.get("CLORA_CUDA_ARCH", DEFAULT_ARCHS) if spec is None else spec
    out = []
    for entry in (a.strip() for a in raw.replace(",", ";").split(";")):
        if not entry:
            continue
        m = _ARCH.match(entry)
        if m is None:
            raise ValueError(f"CLORA_CUDA_ARCH entry {entry!r} is not a compute capability such as 80, 86, 90a, "
                             f"100, 8.6 or 90+PTX (got {raw!r})")
        major, minor, suffix, ptx = m.groups()[:4] if m.group(1) else m.groups()[4:]
        out.append(f"{major}{minor}{suffix}{ptx or ''}")
    return out


def _split(arch: str):
    """("90", "a", True) for "90a+PTX": the number, the suffix letter, whether PTX is asked for."""
    name, ptx = (arch[:-4], True) if arch.endswith("+PTX") else (arch, False)
    suffix = name[-1] if name[-1].isalpha() else ""
    return name[:len(name) - len(suffix)], suffix, ptx


def gencode_flags(archs) -> list:
    """nvcc's -gencode flags for setup.py: sm_ code per architecture, and compute_ (PTX) where asked."""
    flags = []
    for arch in archs:
        num, suffix, ptx = _split(arch)
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num}{suffix},code=compute_{num}{suffix}")
    return flags


def torch_arch_list(archs) -> str:
    """The same architectures as torch's TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX"), for the JIT build."""
    out = []
    for arch in archs:
        num, suffix, ptx = _split(arch)
        out.append(f"{num[:-1]}.{num[-1]}{suffix}" + ("+PTX" if ptx else ""))
    return ";".join(out)


def cuda_home():
    """CUDA_HOME, else the toolkit of the `nvcc` on PATH: the first of its real path's parent and
    /usr/local/cuda that holds include/cuda_runtime.h. (An nvcc wrapper in /usr/local/bin makes
    torch guess /usr/local, which has no CUDA headers or libraries.)"""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    for cand in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return None


_LIB_HEADERS = ("cublas", "cusparse", "cusolver", "curand", "cufft", "nvjitlink")


def extra_include_dirs(cache_root: str) -> list:
    """Headers of the CUDA libraries that ATen's CUDA headers include (cusparse.h, cublas_v2.h,
    ...) when the nvcc toolkit lacks them. pip installs of torch carry them under
    site-packages/nvidia/*/include, but that folder also holds a newer CUDA runtime and CCCL,
    which must not shadow nvcc's own. So only the library headers are linked into a shim folder
    under cache_root (the package's cache directory)."""
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    bases = list(getattr(nvidia, "__path__", []))
    # one shim per location of the headers: venvs elsewhere never meet each other's links
    shim = os.path.join(cache_root, "cuda_lib_headers", hashlib.sha256("|".join(bases).encode()).hexdigest()[:12])
    os.makedirs(shim, exist_ok=True)
    for base in bases:
        for header in glob.glob(os.path.join(base, "*", "include", "*.h")):
            name = os.path.basename(header)
            link = os.path.join(shim, name)
            if not name.lower().startswith(_LIB_HEADERS):
                continue
            if os.path.lexists(link) and os.path.realpath(link) != os.path.realpath(header):
                os.remove(link)
            if not os.path.lexists(link):
                os.symlink(header, link)
    return [shim]
