"""The joint BEVT step at Swin-B shapes on the fast and the reference path, in one run (issue 9).

Per GPU and micro-step: 4 clips of 16x224x224 + 32 images (the official recipe), and 8 clips + 64
images. Records step time, clips/s, images/s, peak memory, MFU and the per-phase breakdown; and the
video-stream step alone against torchvision's swin3d_b.
"""
import pytest
import torch

from benchmarks import train_step as ts

SHAPES = [(4, 32), (8, 64)]


_FLOPS: dict = {}  # per shape, counted on the reference path (it runs first)


@pytest.mark.parametrize("clips,images", SHAPES, ids=[f"{c}clips_{i}images" for c, i in SHAPES])
@pytest.mark.parametrize("path", list(ts.PATHS))  # the reference first: it counts the FLOPs
def test_bevt_step(benchmark, record, path, clips, images):
    sb = ts.build(path, clips, images)
    # warm-up: compilation on the fast paths, capture on the graphed one (its memory is allocated then)
    _, peak_gb, _ = ts.with_peak_memory(lambda: [sb.run() for _ in range(3)])
    benchmark.pedantic(lambda: (sb.run(), torch.cuda.synchronize()), rounds=5, iterations=1, warmup_rounds=2)
    phases = {}
    for _ in range(3):
        sb.run(phases)
    ms = benchmark.stats.stats.median * 1e3
    if path == "ref":
        _FLOPS[clips, images] = ts.step_flops(sb)
    flops = _FLOPS.get((clips, images)) or ts.step_flops(ts.build("ref", clips, images))
    row = dict(op="bevt_step", provider=path, clips=clips, images=images, ms=ms, clips_per_s=clips / ms * 1e3,
               images_per_s=images / ms * 1e3, peak_gb=peak_gb,
               phases_ms={k: v / 3 for k, v in phases.items()},
               mfu=flops / (ms / 1e3) / (ts.H100_BF16_PEAK_TFLOPS * 1e12))
    assert all(p.grad is None for p in sb.model.parameters())  # the step zeroed its gradients
    record(**row)


def test_video_stream_vs_torchvision(record):
    pytest.importorskip("torchvision")
    out = ts.video_stream_vs_torchvision(clips=8)
    record(op="video_stream_step", **{k: v for k, v in out.items()})
