"""Mask generation for one training step: 64 clip tube masks + 64 image block masks (MASK_SHAPE), 14x14 grid.

Providers: ``ref`` (numpy per sample on the host, then copied to the GPU, as a data pipeline would) and
``cuda`` (the bevt._C kernel). Modes: ``clips`` (tube masks), ``images`` (block masks), ``step`` (both; cuda:
one joint launch), ``step_2launch`` (cuda: tube_masks then block_masks, two launches).

Recorded per call: ``ms`` the headline (cuda: GPU time from CUDA-graph replay; ref: wall time),
``gpu_event_ms`` (CUDA events around one eager call: bounded below by the host's launch time),
``graph_ms`` (replaying a graph of 20 calls, per call), ``wall_ms`` (host clock over 200 eager calls, then one
sync), ``cpu_ms`` (the calling thread's CPU time over the same calls: the time a data-loading or training
thread spends; torch's idle worker threads spinning after a CPU op are not counted). The cuda rows also carry
``cpu_saved_ms``: ref CPU time minus cuda CPU time per call.
"""
from __future__ import annotations

import time

import pytest
import torch

try:
    from benchmarks.timing import cuda_time_ms
    from benchmarks.shapes import MASK_SHAPE
except ImportError:  # benchmarks/ itself on sys.path (pytest's default import of a folder without __init__.py)
    from timing import cuda_time_ms
    from shapes import MASK_SHAPE
from bevt.ops import masking as M
from bevt.ops.masking import BlockMaskSpec, TubeSpec

SPEC = BlockMaskSpec(grid=MASK_SHAPE["grid"])
TUBE = TubeSpec(slots=MASK_SHAPE["slots"])
NC, NI = MASK_SHAPE["clips"], MASK_SHAPE["images"]
SHAPE = f"{NC} clips x {TUBE.slots} slots + {NI} images, {SPEC.grid[0]}x{SPEC.grid[1]}"
_ref_cpu_ms: dict[str, float] = {}


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and M.can_run_cuda("cuda", SPEC, TUBE)


def make(provider: str, mode: str):
    """The call to time: fn(step) -> tuple of mask tensors on the GPU."""
    if provider == "ref":
        tube = lambda s: M.tube_masks(NC, SPEC, TUBE, seed=0, step=s, device="cuda", backend="ref")
        block = lambda s: (M.block_masks(NI, SPEC, seed=0, step=s, device="cuda", backend="ref"),)
    else:
        from bevt.ops import _masking_cuda as C

        tube = lambda s: C.tube_masks(NC, SPEC, TUBE, seed=0, step=s, index_offset=0, device="cuda")
        block = lambda s: (C.block_masks(NI, SPEC, seed=0, step=s, index_offset=0, device="cuda"),)
        if mode == "step":
            return lambda s: C.tube_and_block_masks(NC, NI, SPEC, TUBE, SPEC, seed=0, step=s, device="cuda")
    if mode == "clips":
        return tube
    if mode == "images":
        return block
    return lambda s: (*tube(s), *block(s))


def check(provider: str, mode: str, fn) -> None:
    out = fn(3)
    torch.cuda.synchronize()
    for t in out:
        assert t.is_cuda and t.dtype == torch.bool
    if mode in ("clips", "step", "step_2launch"):
        inp, tgt = out[0], out[1]
        assert inp.shape == (NC, TUBE.slots, *SPEC.grid) and tgt.shape == (NC, TUBE.slots * 2, *SPEC.grid)
        assert torch.equal(tgt, inp.repeat_interleave(TUBE.temporal_scale, dim=1))
        length = inp.any((2, 3)).sum(1)
        assert ((length >= 4) & (length <= 8)).all()
    if mode in ("images", "step", "step_2launch"):
        img = out[-1]
        assert img.shape == (NI, *SPEC.grid)
        counts = img.sum((1, 2))
        assert ((counts >= 40) & (counts <= 98)).all()
    if provider == "cuda":
        again = fn(3)
        assert all(torch.equal(a, b) for a, b in zip(out, again)), "not deterministic"
        # the same law as the reference: mean masked count over 4096 masks (ref mean ~96.6, sd ~2.3)
        from bevt.ops import _masking_cuda as C

        big = C.block_masks(4096, SPEC, seed=1, step=0, index_offset=0, device="cuda").sum((1, 2)).float()
        ref = M.block_masks_ref(4096, SPEC, seed=1).sum((1, 2)).float()
        assert abs(big.mean().item() - ref.mean().item()) < 0.25, (big.mean().item(), ref.mean().item())
        if mode == "step":
            sep = make("cuda", "step_2launch")(3)
            assert all(torch.equal(a, b) for a, b in zip(out, sep)), "joint launch differs from separate ones"


def host_times(fn, calls: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call over `calls` eager calls and one final sync."""
    fn(0)
    torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.thread_time()
    for s in range(calls):
        fn(s)
    torch.cuda.synchronize()
    return (time.perf_counter() - w0) * 1e3 / calls, (time.thread_time() - c0) * 1e3 / calls


def graph_ms(fn, per_graph: int = 20, reps: int = 50) -> float:
    """GPU time per call from replaying a CUDA graph that holds `per_graph` calls (median over reps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for s in range(per_graph):
            fn(s)
    return cuda_time_ms(g.replay, warmup=5, rep=reps) / per_graph


@pytest.mark.parametrize("mode", ["clips", "images", "step", "step_2launch"])
@pytest.mark.parametrize("provider", ["ref", "cuda"])
def test_masking_speed(provider, mode, record):
    if provider == "ref" and mode == "step_2launch":
        pytest.skip("the reference has one way to make both")
    if provider == "cuda" and not _cuda_ok():
        pytest.skip(f"cuda backend unavailable: {M.backend_status()['cuda'][1]}")
    fn = make(provider, mode)
    check(provider, mode, fn)
    row = dict(op="masking", provider=provider, mode=mode, shape=SHAPE)
    if provider == "ref":
        wall, cpu = host_times(fn, calls=5)
        _ref_cpu_ms[mode] = cpu
        row.update(ms=wall, wall_ms=wall, cpu_ms=cpu)
    else:
        wall, cpu = host_times(fn, calls=200)
        g = graph_ms(fn)
        row.update(ms=g, graph_ms=g, gpu_event_ms=cuda_time_ms(lambda: fn(0), warmup=10, rep=100),
                   wall_ms=wall, cpu_ms=cpu)
        ref_mode = "step" if mode == "step_2launch" else mode
        if ref_mode not in _ref_cpu_ms:
            _ref_cpu_ms[ref_mode] = host_times(make("ref", ref_mode), calls=5)[1]
        row["cpu_saved_ms"] = _ref_cpu_ms[ref_mode] - cpu
    print(f"\nmasking {provider:4s} {mode:12s} " + " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                            if isinstance(v, float)))
    record(**row)
