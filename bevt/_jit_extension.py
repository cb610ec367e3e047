"""Build the CUDA extension just in time (only when ``BEVT_JIT_EXTENSION=1``; bevt.ops.backend calls it).

The usual way is the ahead-of-time build (``BEVT_BUILD_EXT=1 pip install --no-build-isolation -e .``);
this one compiles ``csrc/`` of a source checkout with torch.utils.cpp_extension.load into torch's
extension cache on first use (a minute or two), which registers the same ``torch.ops.bevt.*`` operators.
``BEVT_CUDA_ARCH`` (e.g. "9.0") picks the architectures as for setup.py; by default torch builds for the
GPUs it sees.
"""
from __future__ import annotations

import functools
import glob
import os

# the same flags as setup.py's CUDAExtension
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]


def csrc_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@functools.lru_cache(maxsize=None)
def load():
    """Compile and load the extension; returns the module. Raises RuntimeError saying why it cannot."""
    import torch
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = sorted(glob.glob(os.path.join(src, "*.cu")) + glob.glob(os.path.join(src, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no CUDA sources in {src}: the JIT build needs a source checkout of bevt")
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU build; the extension needs a CUDA build of torch")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    arch = os.environ.get("BEVT_CUDA_ARCH")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return cpp_extension.load(
        name="bevt_C_jit",
        sources=sources,
        extra_include_paths=[src],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        verbose=False,
    )
