"""Build script. Metadata lives in pyproject.toml.

The CUDA extension in csrc/ is optional (DESIGN.md section 5). It is built only when csrc/ holds
sources, nvcc and a CUDA build of torch are present, and CLORA_BUILD_CUDA is not "0". Without
them this installs the pure-Python package cleanly, and the `cuda` backend reports why it is
unusable (`clora_kernels.available_backends()`).
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("CLORA_BUILD_CUDA", "1") == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from clora_kernels.backends.cuda import cuda_home, extra_include_dirs   # the JIT build's own helpers
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
    archs = os.environ.get("CLORA_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    nvcc_flags = ["-O3", "--use_fast_math"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension("clora_kernels._C", sources, include_dirs=extra_include_dirs(),
                        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags})
    return [ext], {"build_ext": BuildExtension}


_ext, _cmdclass = _cuda_extensions()
setup(ext_modules=_ext, cmdclass=_cmdclass)
