"""Benchmarks run on a CUDA GPU only; without one every benchmark is skipped with the reason.

Each benchmark checks correctness against the reference before timing, then records its numbers with
``record(...)``; at the end of the session they are written to
``benchmarks/results/<gpu>_torch<version>_cuda<version>.json`` (RESULTS.md is written from those files).
"""
import json
import os
import re
import time

import pytest
import torch

_RESULTS: list[dict] = []


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible); they time and check the GPU kernels")
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):  # only this folder's items (pytest tests benchmarks)
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if not _RESULTS or not torch.cuda.is_available():
        return
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-")
    name = f"{gpu}_torch{torch.__version__.split('+')[0]}_cuda{torch.version.cuda}.json"
    out_dir = os.environ.get("BEVT_BENCH_OUT", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": _RESULTS}, f, indent=1)
    print(f"\nbenchmark results written to {path}")


@pytest.fixture
def record():
    """record(op=..., provider=..., mode=..., shape=..., ms=..., **more): keep one row for the results file."""
    def _record(**row):
        _RESULTS.append(row)
    return _record
