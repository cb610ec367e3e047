"""GPU development script for the CUDA mask kernel: times variants and sizes, prints a table last.

Run after building the extension (``BEVT_BUILD_EXT=1 pip install --no-build-isolation -e .``):
    python benchmarks/gpu_masking.py [--out DIR]
Writes gpu_masking.json to DIR (default: the current folder). The acceptance tests are
tests/test_masking_cuda.py; the numbers for the results table come from benchmarks/test_masking.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

from bevt.ops import masking as M
from bevt.ops.masking import BlockMaskSpec, TubeSpec
from timing import cuda_time_ms, graph_time_ms, kernel_times_ms  # run as a script: benchmarks/ is on sys.path


def kernel_ms(fn, calls=50):
    """Mean duration of the mask kernel itself (profiler), without launch overhead."""
    for name, (ms, launches) in kernel_times_ms(fn, calls).items():
        if "masks_kernel" in name:
            return ms / launches
    return float("nan")


def host_ms(fn, calls=200):
    fn()
    torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - w0) * 1e3 / calls, (time.thread_time() - c0) * 1e3 / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from bevt.ops import _masking_cuda as C

    ok, why = M.backend_status()["cuda"]
    assert ok, why
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except OSError:
        nvcc = "nvcc not found"
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "nvcc": nvcc, "date": time.strftime("%Y-%m-%d")}
    print(meta)
    spec, tube = BlockMaskSpec(), TubeSpec()
    key = dict(seed=0, step=0, index_offset=0, device="cuda")
    variants = {
        "block 64": lambda: C.block_masks(64, spec, **key),
        "tube 64": lambda: C.tube_masks(64, spec, tube, **key),
        "joint 64+64 (1 launch)": lambda: C.tube_and_block_masks(64, 64, seed=0, step=0, device="cuda"),
        "tube+block 64+64 (2 launches)": lambda: (C.tube_masks(64, spec, tube, **key), C.block_masks(64, spec, **key)),
        "block 64 exact": lambda: C.block_masks(64, BlockMaskSpec(exact=True), **key),
        "block 64 traced": lambda: C.block_masks(64, spec, return_trace=True, **key),
        "block 64 32x32 (40%)": lambda: C.block_masks(64, BlockMaskSpec.for_grid((32, 32), 0.4), **key),
        "block 64 7x13 (byte stores)": lambda: C.block_masks(
            64, BlockMaskSpec(grid=(7, 13), num_masking_patches=45, min_num_patches=7), **key),
        "tube 64, 64 slots": lambda: C.tube_masks(64, spec, TubeSpec(slots=64), **key),
        "block 8": lambda: C.block_masks(8, spec, **key),
        "block 1024": lambda: C.block_masks(1024, spec, **key),
        "block 16384": lambda: C.block_masks(16384, spec, **key),
        "joint 1024+1024": lambda: C.tube_and_block_masks(1024, 1024, seed=0, step=0, device="cuda"),
    }
    rows = {}
    # the numpy reference for one step (64 clips + 64 images), on the host, and with the copy to the GPU
    ref_cpu = lambda: (M.tube_masks_ref(64, spec, tube), M.block_masks_ref(64, spec))
    ref_gpu = lambda: (M.tube_masks_ref(64, spec, tube, device="cuda"), M.block_masks_ref(64, spec, device="cuda"))
    for name, fn in (("ref 64+64 (host)", ref_cpu), ("ref 64+64 (+copy to GPU)", ref_gpu)):
        wall, cpu = host_ms(fn, calls=10)
        rows[name] = dict(graph_us=float("nan"), kernel_us=float("nan"), event_us=float("nan"), wall_us=wall * 1e3,
                          cpu_us=cpu * 1e3)
    for name, fn in variants.items():
        wall, cpu = host_ms(fn)
        rows[name] = dict(graph_us=graph_time_ms(fn) * 1e3, kernel_us=kernel_ms(fn) * 1e3, event_us=cuda_time_ms(fn) * 1e3,
                          wall_us=wall * 1e3, cpu_us=cpu * 1e3)
    with open(os.path.join(args.out, "gpu_masking.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{'variant':34s} {'kernel us':>10s} {'graph us':>10s} {'event us':>10s} {'wall us':>10s} {'cpu us':>10s}")
    for name, r in rows.items():
        print(f"{name:34s} {r['kernel_us']:10.2f} {r['graph_us']:10.2f} {r['event_us']:10.2f} {r['wall_us']:10.1f} "
              f"{r['cpu_us']:10.1f}")


if __name__ == "__main__":
    main()
