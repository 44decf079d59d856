"""The `cuda` backend: wrappers over torch.ops.clora.cuda_linear_fwd / cuda_linear_dx from the
csrc/ extension (docs/design.md section 5).

The extension is taken from `clora_kernels._C` when setup.py built it; otherwise the first use on
a CUDA machine JIT-builds csrc/ with torch.utils.cpp_extension.load into a cache directory
(CLORA_CACHE_DIR, default ~/.cache/clora_kernels/cuda_ext/<hash>). A failed build makes the
backend unusable with the compiler's first error line as the reason; `auto` moves on.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re

import torch

from .._cuda_build import NVCC_FLAGS, cuda_archs, cuda_home, extra_include_dirs, torch_arch_list
from .._io import cache_dir
from . import KernelBackend, register



def csrc_dir() -> str:
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))


def sources() -> list:
    d = csrc_dir()
    return sorted(glob.glob(os.path.join(d, "*.cu")) + glob.glob(os.path.join(d, "*.cpp")))


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "unknown build error"


def registered() -> bool:
    """Whether this process has the extension's ops (from clora_kernels._C or a JIT build)."""
    return hasattr(torch.ops.clora, "cuda_linear_fwd")


def jit_archs() -> list:
    """What the JIT build targets: CLORA_CUDA_ARCH where set, else the visible GPUs' own compute
    capabilities (so that the build always runs where it is made), else the default of `cuda_archs`."""
    if "CLORA_CUDA_ARCH" not in os.environ and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return cuda_archs(";".join(f"{major}{minor}" for major, minor in caps))
    return cuda_archs()


def build(build_dir=None, verbose: bool = False) -> str:
    """JIT-build csrc/ and load it into this process (registers torch.ops.clora.cuda_*).
    Returns the build directory. Raises RuntimeError with the compiler's first error line, and
    before building where the ops are registered already: a second library registering them
    would abort the process. Targets: `jit_archs` (CLORA_CUDA_ARCH, else the visible GPUs), or
    TORCH_CUDA_ARCH_LIST where it is set and CLORA_CUDA_ARCH is not, for this build only (the
    environment is restored after it)."""
    if registered():
        raise RuntimeError("the clora CUDA ops are registered in this process already (clora_kernels._C or an "
                           "earlier build); loading a second build would abort the process")
    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources in {csrc_dir()} (install from a source checkout)")
    home = cuda_home()
    if home is None:
        raise RuntimeError("nvcc was not found and CUDA_HOME is not set")
    try:        # CLORA_CUDA_ARCH, then TORCH_CUDA_ARCH_LIST, then the visible GPUs (setup.py reads the first alone)
        own = "CLORA_CUDA_ARCH" in os.environ or not os.environ.get("TORCH_CUDA_ARCH_LIST")
        arch_list = torch_arch_list(jit_archs()) if own else os.environ["TORCH_CUDA_ARCH_LIST"]
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = home
    flags, includes = list(NVCC_FLAGS), extra_include_dirs(cache_dir())
    # the cache key: sources, flags, include dirs, arch list, torch and the CUDA home (a second test run on a
    # machine reuses the build; any change rebuilds)
    digest = hashlib.sha256(repr((torch.__version__, arch_list, flags, includes, home)).encode())
    for s in srcs:
        with open(s, "rb") as f:
            digest.update(f.read())
    if build_dir is None:
        build_dir = cache_dir("cuda_ext", digest.hexdigest()[:16])
    os.makedirs(build_dir, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    os.environ["CUDA_HOME"], os.environ["TORCH_CUDA_ARCH_LIST"] = saved["CUDA_HOME"] or home, arch_list
    try:
        ce.load(name="clora_cuda_ext", sources=srcs, build_directory=build_dir, extra_cuda_cflags=flags,
                extra_cflags=flags, extra_include_paths=includes, is_python_module=False,
                verbose=verbose)
    except Exception as exc:   # ninja/nvcc output is in the message
        raise RuntimeError(f"building the CUDA extension failed: {_first_error_line(str(exc))}") from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return build_dir


FUSED_MAX_MR_DEFAULT = 1024


def fused_max_mr() -> int:
    """Largest M·r served by the fused shrink (one pass over x, split over K); above it t = x·Aᵀ
    comes from cuBLAS, which reuses A across rows. Env CLORA_CUDA_FUSED_MAX_MR; the default 1024
    (M <= 64 at r = 16) is a first guess, not yet tuned on a GPU."""
    raw = os.environ.get("CLORA_CUDA_FUSED_MAX_MR", "")
    if not raw:
        return FUSED_MAX_MR_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"environment variable CLORA_CUDA_FUSED_MAX_MR must be an integer >= 0, got {raw!r}")
    return value


def _runs_here(found: str):
    """(usable, why) for the extension `found` describes: unusable where it holds no code for the
    current GPU (built for other architectures: setup.py's CLORA_CUDA_ARCH, or another machine's
    JIT build), which the extension's own cuda_runs_here answers (an extension from before it had
    that op is taken as it is)."""
    runs_here = getattr(torch.ops.clora, "cuda_runs_here", None)
    try:
        why = runs_here(torch.cuda.current_device()) if runs_here is not None else ""
    except RuntimeError as exc:         # (the CUDA runtime itself failing: the backend cannot run either)
        return False, f"{found}, but CUDA failed asking it: {str(exc).splitlines()[0]}"
    if not why:
        return True, found
    major, minor = torch.cuda.get_device_capability()
    return False, (f"{found}, but it has no code for this GPU (sm_{major}{minor}): {why}; build it for this GPU "
                   f"(CLORA_CUDA_ARCH={major}{minor}, or unset for the JIT build)")


class CudaBackend(KernelBackend):
    name = "cuda"

    def _probe(self):
        """Builds the extension on first use on a CUDA machine (availability() caches this)."""
        if torch.version.cuda is None:
            return False, "torch is a CPU-only build"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is available"
        if registered():
            return _runs_here("CUDA extension loaded")
        try:
            import clora_kernels._C  # noqa: F401  (built by setup.py; registers the ops)
            return _runs_here("CUDA extension clora_kernels._C (built by setup.py)")
        except ImportError:
            pass
        try:
            path = build()
        except RuntimeError as exc:
            return False, str(exc)
        return _runs_here(f"CUDA extension JIT-built in {path}")

    def device_reasons(self, x, weight, auto):
        return [] if x.device.type == "cuda" else [f"tensors are on {x.device}, the cuda backend needs a CUDA device"]

    def forward(self, x, weight, bias, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t=True, auto=False,
                r_eff=None):     # r_eff unused: the kernels build R_eff from r_old, r_delta and proj
        return torch.ops.clora.cuda_linear_fwd(x, weight, bias, lora_a, lora_b, r_old, r_delta, proj, scaling,
                                               fused_max_mr())

    def dx(self, g, weight, lora_a, lora_b, r_old, r_delta, proj, scaling, auto=False, r_eff=None):
        return torch.ops.clora.cuda_linear_dx(g, weight, lora_a, lora_b, r_old, r_delta, proj, scaling,
                                              fused_max_mr())


register(CudaBackend())
