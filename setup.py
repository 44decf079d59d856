"""Build script. Metadata lives in pyproject.toml.

The CUDA extension in csrc/ is optional (DESIGN.md section 5). It is built only when csrc/ holds
sources, nvcc and a CUDA build of torch are present, and CLORA_BUILD_CUDA is not "0". Without
them this installs the pure-Python package cleanly, and the `cuda` backend reports why it is
unusable (`clora_kernels.available_backends()`).
"""
import glob
import importlib.util
import os
import shutil

from setuptools import setup


def _package_file(name):
    """clora_kernels/<name>.py loaded by path: a standard-library-only module of the package, used
    here without importing clora_kernels (whose import needs torch and the package's dependencies)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clora_kernels", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_clora_setup_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    build, io = _package_file("_cuda_build"), _package_file("_io")   # the JIT build's own settings
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = os.environ["CUDA_HOME"] = build.cuda_home()
    nvcc_flags = build.NVCC_FLAGS + build.gencode_flags(build.cuda_archs())
    ext = CUDAExtension("clora_kernels._C", sources, include_dirs=build.extra_include_dirs(io.cache_dir()),
                        extra_compile_args={"cxx": build.NVCC_FLAGS, "nvcc": nvcc_flags})
    return [ext], {"build_ext": BuildExtension}


_ext, _cmdclass = _cuda_extensions()
setup(ext_modules=_ext, cmdclass=_cmdclass)
