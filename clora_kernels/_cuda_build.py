"""What the CUDA build of csrc/ targets and where its toolkit is: the one home of these settings
for setup.py (`clora_kernels._C`) and the JIT build (backends/cuda.py). Standard library only, and
no imports from the package: setup.py loads this file by path, without importing clora_kernels or
torch."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil

DEFAULT_ARCHS = "80;90"


def cuda_archs() -> list:
    """Target compute capabilities from env CLORA_CUDA_ARCH (';' or ',' separated, default
    "80;90"), e.g. ["80", "90"]."""
    return [a for a in os.environ.get("CLORA_CUDA_ARCH", DEFAULT_ARCHS).replace(",", ";").split(";") if a]


def gencode_flags(archs) -> list:
    """nvcc's -gencode flags for setup.py, one per architecture."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def torch_arch_list(archs) -> str:
    """The same architectures as torch's TORCH_CUDA_ARCH_LIST ("8.0;9.0"), for the JIT build."""
    return ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)


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
