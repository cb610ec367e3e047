"""GPU timing helpers shared by the benchmarks and the development scripts (one way to time a call).

* :func:`cuda_time_ms`: median of CUDA-event-timed calls, host launch time included when the GPU waits
  for it (what a caller sees);
* :func:`graph_time_ms`: median GPU time per call from replaying a CUDA graph of ``calls`` calls (no
  host launch time: what the kernels cost);
* :func:`peak_extra_mib`: peak memory a call allocates above what was allocated before it;
* :func:`kernel_times_ms`: GPU time of each CUDA kernel a call launches (profiler).
"""
from __future__ import annotations

import torch


def cuda_time_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median time of fn() in ms with CUDA events (after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, calls: int = 20, rep: int = 10) -> float:
    """GPU time per call of fn() from replaying a CUDA graph of ``calls`` calls (warmed up on a side
    stream first, as graph capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = cuda_time_ms(graph.replay, warmup=1, rep=rep) / calls
    del graph
    torch.cuda.empty_cache()
    return ms


def peak_extra_mib(fn) -> float:
    """Peak memory allocated by fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def kernel_times_ms(fn, calls: int = 2) -> dict[str, tuple[float, int]]:
    """GPU time of each CUDA kernel fn() launches, from torch.profiler after one warm-up call:
    kernel name -> (ms per call of fn, launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {evt.key: (evt.self_device_time_total / 1e3 / calls, evt.count // calls)
            for evt in prof.key_averages() if evt.self_device_time_total > 0}
