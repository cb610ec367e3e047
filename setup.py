"""bevt: BERT pretraining of video transformers, fast.

Layout (see README): the Python package lives in bevt/, the Triton kernels in kernels/ (installed as
``bevt.kernels``), the CUDA extension sources in csrc/ (built as ``bevt._C``).

The CUDA extension is optional. It is built when all of these hold:
  * the installing environment has a CUDA build of torch (use ``pip install --no-build-isolation``, since
    pip's isolated build environment has no torch at all), and
  * nvcc is found (CUDA_HOME or PATH), and
  * BEVT_BUILD_EXT is not "0".
BEVT_BUILD_EXT=1 turns a skipped build into an error that says why. BEVT_CUDA_ARCH (or the usual
TORCH_CUDA_ARCH_LIST) picks the architectures, e.g. "7.0;8.0;9.0" for V100/A100/H100 (CUDA 12; CUDA 13
builds 7.5 and newer, e.g. "8.0;9.0"); by default torch builds for the GPUs it sees.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _archs_nvcc_cannot_build(cuda_home, arch_list):
    """Entries of an arch list ("7.0;8.0;9.0+PTX") that this nvcc cannot target (CUDA 13 dropped < 7.5)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # an nvcc without --list-gpu-arch: the build itself will say
    known = set(re.findall(r"compute_(\d+)", out))
    bad = []
    for token in re.split(r"[;,\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", token)
        if known and m and m[1] + m[2] not in known:
            bad.append(token)
    return bad


def _extension_build():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a printed reason."""
    want = os.environ.get("BEVT_BUILD_EXT", "auto").lower()
    if want in ("0", "false", "no", "off"):
        return [], {}
    reasons = []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        reasons.append("no sources in csrc/")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
        reasons.append("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if torch is not None:
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is a CPU build")
        if CUDA_HOME is None:
            reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        msg = "bevt: skipping the CUDA extension bevt._C: " + "; ".join(reasons)
        if want in ("1", "true", "yes", "on"):
            sys.exit(msg + " (BEVT_BUILD_EXT=1 asked for it)")
        print(msg, file=sys.stderr)
        return [], {}
    arch = os.environ.get("BEVT_CUDA_ARCH")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    bad = _archs_nvcc_cannot_build(CUDA_HOME, arch) if arch else []
    if bad:  # an explicit request nvcc cannot meet: say so now rather than through nvcc's own error
        sys.exit(f"bevt: the nvcc in {CUDA_HOME} cannot build for {', '.join(bad)} (arch list {arch!r}); "
                 "CUDA 13 builds compute capability 7.5 and newer, use CUDA 12 for 7.0 (V100), or set BEVT_CUDA_ARCH")
    print(f"bevt: building the CUDA extension bevt._C ({len(sources)} sources, arch list "
          f"{arch or 'of the visible GPUs (torch default)'})", file=sys.stderr)
    # no -std flag: torch.utils.cpp_extension picks the C++ standard its headers need
    ext = CUDAExtension(
        name="bevt._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="bevt",
    version="0.1.0",
    description="BEVT (BERT pretraining of video transformers) with fused Triton/CUDA kernels and GPU data loading",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["bevt", "bevt.ops", "bevt.models", "bevt.tokenizers", "bevt.data", "bevt.train", "bevt.eval", "bevt.kernels"],
    # kernels/ sits at the top level of the repository but ships inside the package: a top-level module
    # named "kernels" would collide with other distributions.
    package_dir={"bevt": "bevt", "bevt.kernels": "kernels"},
    install_requires=[
        # torch is not pinned here: install the build for your machine first (CPU or CUDA); any torch
        # >= 2.4 already installed satisfies this and pip pulls nothing more.
        "torch>=2.4",
        "numpy>=1.24",
        "av>=12",
        "pillow>=9",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.6",  # bevt eval's per-class / confusion PNG
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=7", "triton>=3.2"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.2"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
    },
    entry_points={"console_scripts": ["bevt=bevt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
