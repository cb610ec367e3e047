"""DALI vs PyAV on a GPU machine: NVDEC frame indices, pixel agreement, throughput and data wait.

Run as a script (prints a table, writes JSON with ``--out``), or through ``benchmarks/test_dali.py``
(pytest, which asserts correctness before timing and records the rows). Everything uses synthetic H.264
data written on the machine itself (``make_data``): 340x256 clips of 160 frames (the K400 short side),
JPEG stills of the same size, and frame-id videos whose frames carry their own index.

* ``check_frame_indices``: DALI (NVDEC) clips and tokenizer copies of the full pretraining recipe
  (16 x 8 frames, 224 crop, 112 copy) show exactly the frames the dataset's plan asked for, as PyAV's.
* ``pixel_agreement``: DALI vs PyAV batches of the same samples: mean / p99 / max |diff| in levels.
* ``throughput``: clips/s (batch 8) and images/s (batch 64) of the full pretraining augmentation.
* ``data_wait``: a training loop whose step takes ``step_ms`` on the GPU (``sleep``: a spinning kernel
  that leaves the SMs free; ``busy``: bf16 matmuls that occupy them) and takes one video and one image
  batch per step: how long ``next(loader)`` blocks, as a share of the step.

Usage: ``python benchmarks/gpu_dali.py --data runs/dali_bench --out results.json``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevt.data.datasets import ImageDataset, Sample, VideoClipDataset
from bevt.data.loader import TorchLoader, cycle
from bevt.data.transforms import normalize

VIDEO_BATCH, IMAGE_BATCH = 8, 64
# dali = the loader's defaults (2 reader pipelines for training videos, 1 for images); dali:T:P:N spelled out
PROVIDERS = {"video": ["dali:4:2:1", "dali:4:2:2", "dali:4:2:4", "dali-per-sample", "pyav8", "pyav16"],
             "image": ["dali", "pyav8", "pyav16"]}
FRAME_ID_FRAMES = 160
# The joint BEVT step at 8 clips + 64 images on one H100, fast path (benchmarks/RESULTS.md): the pace the
# loaders must keep, and the 150 ms used before that step was measured.
SWIN_B_STEP_MS = 238.0
# data-wait runs: (video loader, image loader, GPU work, step ms). "pyav16+dali" is what decoder=auto picks on
# a GPU machine with DALI (videos on CPU workers, images on nvJPEG).
DATA_WAIT = [("dali", "dali", "busy", SWIN_B_STEP_MS), ("dali:4:2:1", "dali", "busy", SWIN_B_STEP_MS),
             ("pyav16", "dali", "busy", SWIN_B_STEP_MS), ("dali", "dali", "busy", 150.0)]


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def _frame_id_clip(n: int, h: int, w: int) -> np.ndarray:
    """uint8 (n, h, w, 3): frame t has flat grey 16 + 5 (t % 40) in its top half, 16 + 5 (t // 40) below."""
    frames = np.empty((n, h, w, 3), np.uint8)
    t = np.arange(n)
    frames[:, : h // 2] = (16 + 5 * (t % 40)).astype(np.uint8)[:, None, None, None]
    frames[:, h // 2:] = (16 + 5 * (t // 40)).astype(np.uint8)[:, None, None, None]
    return frames


def frame_ids(x_BT3HW: torch.Tensor) -> np.ndarray:
    """Frame indices of frame-id frames, however cropped, scaled or flipped -> int (B, T)."""
    x = x_BT3HW.float()
    band = max(2, x.shape[-2] // 14)
    top = x[..., :band, :].mean(dim=(-3, -2, -1))
    bottom = x[..., -band:, :].mean(dim=(-3, -2, -1))
    lo = torch.round((top - 16) / 5)
    hi = torch.round((bottom - 16) / 5)
    return (lo + 40 * hi).long().cpu().numpy()


def make_data(root: str | os.PathLike, *, num_videos: int = 256, num_images: int = 512, frames: int = 160,
              size: tuple[int, int] = (340, 256), workers: int | None = None) -> dict:
    """Write (or reuse) the benchmark data under ``root`` -> dict of lists and sample lists."""
    from bevt.data import synth
    from bevt.data.synth import write_video

    root = Path(root)
    big = synth.ensure(root / "synth", num_train=num_videos, num_val=0, num_images=num_images, num_frames=frames,
                       size=size, codec="h264", workers=workers)
    small = synth.ensure(root / "small", num_train=4, num_val=0, num_images=0, num_frames=48, size=(160, 128),
                         codec="h264", workers=1)
    ids = []
    (root / "frame_id").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        path = root / "frame_id" / f"id{i}.mp4"
        if not path.is_file():
            write_video(path, _frame_id_clip(FRAME_ID_FRAMES, 256, 320), codec="h264")
        ids.append(Sample(str(path), i))
    return {"videos": str(big.train_list), "images": str(big.images_list), "small": str(small.train_list),
            "frame_id": ids}


# ----------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------

def video_dataset(items, **kw) -> VideoClipDataset:
    return VideoClipDataset(items, "pretrain", seed=0, **kw)  # the recipe: 16 x 8, 256-320, 224, 112


def image_dataset(items) -> ImageDataset:
    return ImageDataset(items, "pretrain", seed=0)


def make_loader(provider: str, ds, batch_size: int, **kw):
    """``dali`` (the loader's defaults) / ``dali:THREADS:PREFETCH:PIPELINES``, ``dali-per-sample`` (no file-list
    readers: every clip decoded alone) or ``pyavN`` (N workers)."""
    if provider == "dali-per-sample":
        from bevt.data.dali import DaliLoader

        return DaliLoader(ds, batch_size, file_lists=False, **kw)
    if provider.startswith("dali"):
        from bevt.data.dali import DaliLoader

        parts = provider.split(":")
        if len(parts) == 1:
            return DaliLoader(ds, batch_size, **kw)
        threads, prefetch, pipelines = (int(x) for x in parts[1:])
        return DaliLoader(ds, batch_size, num_threads=threads, prefetch=prefetch, pipelines=pipelines, **kw)
    if provider.startswith("pyav"):
        # forkserver: workers do not inherit the DALI pipelines' threads of this process
        return TorchLoader(ds, batch_size, num_workers=int(provider[4:]), seed=ds.seed,
                           multiprocessing_context="forkserver", **kw)
    raise ValueError(f"unknown provider {provider!r}")


# ----------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------

def check_frame_indices(data: dict) -> dict:
    """Frame ids of DALI's and PyAV's clips (and tokenizer copies) vs the plans, over two epochs."""
    from bevt.data.dali import DaliLoader
    from bevt.data.video_io import probe

    ds = video_dataset(data["frame_id"])
    dali = DaliLoader(ds, 2)
    cpu = TorchLoader(ds, 2, seed=0)
    frames = mismatches = 0
    for epoch in range(2):
        for a, b in zip(list(dali), list(cpu)):
            want = []
            for i in a["index"].tolist():
                info = probe(ds.items[i].path)
                inds, _ = ds.plan(ds.rng(epoch, i), info.num_frames, info.height, info.width)
                want.append(inds)
            want = np.stack(want)
            for got in (frame_ids(a["video"].transpose(1, 2)), frame_ids(a["video_tok"]),
                        frame_ids(b["video"].transpose(1, 2))):
                frames += got.size
                mismatches += int((got != want).sum())
    dali.close()
    return {"frames_checked": frames, "mismatches": mismatches}


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.to("cpu", torch.int16) - b.to("cpu", torch.int16)).abs().flatten().float().numpy()
    return {"mean": round(float(d.mean()), 3), "p99": float(np.percentile(d, 99)), "max": float(d.max())}


def pixel_agreement(data: dict, batches: int = 2) -> dict:
    """DALI vs PyAV on the same samples (H.264 via NVDEC, JPEG via nvJPEG; also the 160x128 clips)."""
    out = {}
    for name, ds, bs in (("video", video_dataset(data["videos"]), VIDEO_BATCH),
                         ("video_160x128", video_dataset(data["small"], scale=(128, 160), crop=112, tok_size=56), 2),
                         ("image", image_dataset(data["images"]), IMAGE_BATCH)):
        dali, cpu = make_loader("dali", ds, bs), make_loader("pyav4", ds, bs)
        rows: dict[str, list] = {}
        try:
            for k, (a, b) in enumerate(zip(dali, cpu)):
                assert torch.equal(a["index"].cpu(), b["index"]) and torch.equal(a["label"].cpu(), b["label"])
                for key in b:
                    if key not in ("index", "label"):
                        rows.setdefault(key, []).append(_stats(a[key], b[key]))
                if k + 1 == batches:
                    break
            out[name] = {key: {m: max(r[m] for r in v) for m in ("mean", "p99", "max")} for key, v in rows.items()}
            out[name]["skipped"] = len(dali.skipped_files)
        except Exception as e:  # reported, not fatal: the script goes on to the timings
            out[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        finally:
            dali.close()
            cpu.close()
    return out


def check_robustness(data: dict, tmp: str | os.PathLike) -> dict:
    """H.264 through NVDEC with broken files: a truncated, a garbage and an empty file found by the probe,
    and a file replaced by garbage after the probe (DALI fails mid-run: the loader must skip it and go on)."""
    import shutil
    import warnings

    from bevt.data.dali import DaliLoader
    from bevt.data.datasets import read_annotation_list

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    good = read_annotation_list(data["videos"])[:6]
    items = []
    for i, s in enumerate(good):
        shutil.copy(s.path, tmp / f"v{i}.mp4")
        items.append(Sample(str(tmp / f"v{i}.mp4"), s.label))
    raw = open(good[0].path, "rb").read()
    (tmp / "truncated.mp4").write_bytes(raw[: len(raw) // 2])
    (tmp / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp / "empty.mp4").write_bytes(b"")
    items[1:1] = [Sample(str(tmp / n), 0) for n in ("truncated.mp4", "garbage.mp4", "empty.mp4")]
    ds = video_dataset(items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = DaliLoader(ds, 3, shuffle=False)
        probed = len(loader.skipped_files)
        (tmp / "v4.mp4").write_bytes(np.random.default_rng(1).bytes(20000))  # breaks after the probe
        batches = [b["index"].tolist() for b in loader]
    out = {"probe_skipped": probed, "skipped": len(loader.skipped_files), "recoveries": loader.recoveries,
           "batches": len(batches), "reasons": {Path(k).name: v[:120] for k, v in loader.skipped_reasons.items()}}
    loader.close()
    return out


# ----------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------

def throughput(loader, batch_size: int, *, batches: int, warmup: int) -> float:
    """Samples per second over ``batches`` batches after ``warmup`` (the prefetch buffers drained by then)."""
    it = cycle(loader)
    for _ in range(warmup):
        next(it)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - t0)


def _sleep_cycles_per_ms() -> float:
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(20_000_000)
    e.record()
    torch.cuda.synchronize()
    return 20_000_000 / s.elapsed_time(e)


def make_step(step_ms: float, kind: str):
    """A function that queues ``step_ms`` of GPU work: ``sleep`` (idle SMs) or ``busy`` (bf16 matmuls)."""
    dev = torch.device("cuda")
    if kind == "sleep":
        cycles = int(_sleep_cycles_per_ms() * step_ms)
        return lambda: torch.cuda._sleep(cycles)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 20 * 1e3
    n = max(1, round(step_ms / per))

    def step():
        for _ in range(n):
            a @ a
    return step


def data_wait(video_loader, image_loader, *, step_ms: float = 150.0, kind: str = "sleep", steps: int = 40,
              warmup: int = 8) -> dict:
    """Training-loop proxy: per step, next() of both loaders, use the batches, ``step_ms`` of GPU work, sync.

    Returns the mean wait in next() (ms), the mean step (ms) and the wait's share of the step.
    """
    dev = torch.device("cuda")
    work = make_step(step_ms, kind)
    vit, iit = cycle(video_loader), cycle(image_loader)
    waits, totals = [], []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        vb, ib = next(vit), next(iit)
        t1 = time.perf_counter()
        # what the training step does with them first (a no-op copy for DALI's device tensors)
        v = normalize(vb["video"].to(dev, non_blocking=True), channel_dim=1)
        i = normalize(ib["images"].to(dev, non_blocking=True), channel_dim=1)
        vt, it_ = vb["video_tok"].to(dev, non_blocking=True), ib["images_tok"].to(dev, non_blocking=True)
        work()
        torch.cuda.synchronize()  # the step's host sync (loss read): the next step starts after it
        t2 = time.perf_counter()
        if s >= warmup:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
        del v, i, vt, it_
    w, t = float(np.mean(waits)) * 1e3, float(np.mean(totals)) * 1e3
    return {"wait_ms": round(w, 2), "step_ms": round(t, 1), "wait_share": round(w / t, 4),
            "wait_p90_ms": round(float(np.percentile(waits, 90)) * 1e3, 2)}


def _warmup_batches(provider: str) -> int:
    return 8 if provider.startswith("dali") else 2 * int(provider[4:]) + 4


def measure_data_wait(data: dict, video_provider: str, image_provider: str, *, kind: str, step_ms: float,
                      steps: int) -> dict:
    """data_wait() with a video loader and an image loader of the given providers on the benchmark data."""
    vl = make_loader(video_provider, video_dataset(data["videos"]), VIDEO_BATCH)
    il = make_loader(image_provider, image_dataset(data["images"]), IMAGE_BATCH)
    try:
        return data_wait(vl, il, step_ms=step_ms, kind=kind, steps=steps,
                         warmup=max(_warmup_batches(video_provider), _warmup_batches(image_provider)))
    finally:
        vl.close()
        il.close()


# ----------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------

def _guard(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}


SECTIONS = ("checks", "throughput", "data_wait")


def run_all(data_root: str, *, quick: bool = False, out: str | None = None, sections=SECTIONS) -> dict:
    from bevt.data.dali import dali_status

    t_start = time.perf_counter()
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "dali_status": dali_status()}
    try:
        import nvidia.dali

        res["dali"] = nvidia.dali.__version__
    except ImportError:
        res["dali"] = None
    t0 = time.perf_counter()
    data = make_data(data_root, workers=os.cpu_count())
    res["data_s"] = round(time.perf_counter() - t0, 1)
    print(f"data ready in {res['data_s']} s", flush=True)

    def save():  # after every section: a run cut short still leaves its numbers
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=1)
    if "checks" in sections:
        res["frame_indices"] = _guard(check_frame_indices, data)
        print("frame indices", res["frame_indices"], flush=True)
        res["pixels"] = _guard(pixel_agreement, data)
        print("pixels", json.dumps(res["pixels"]), flush=True)
        res["robustness"] = _guard(check_robustness, data, Path(data_root) / "broken")
        print("robustness", res["robustness"], flush=True)
        save()

    if "throughput" in sections:
        vb, ib = (6, 4) if quick else (24, 24)
        res["throughput"] = {}
        for kind, ds, bs, n in (("video", video_dataset(data["videos"]), VIDEO_BATCH, vb),
                                ("image", image_dataset(data["images"]), IMAGE_BATCH, ib)):
            for p in (["dali", "pyav8"] if quick else PROVIDERS[kind]):
                def measure():
                    loader = make_loader(p, ds, bs)
                    try:
                        workers = int(p[4:]) if p.startswith("pyav") else 1
                        return round(throughput(loader, bs, batches=n, warmup=2 * workers + 3), 1)
                    finally:
                        loader.close()
                r = _guard(measure)
                res["throughput"][f"{kind}/{p}"] = r
                print(f"throughput {kind} {p}: {r} {'clips' if kind == 'video' else 'images'}/s", flush=True)
                save()

    if "data_wait" in sections:
        res["data_wait"] = {}
        steps = 10 if quick else 30
        for vp, ip, kind, step_ms in DATA_WAIT[:1] if quick else DATA_WAIT:
            r = _guard(measure_data_wait, data, vp, ip, kind=kind, step_ms=step_ms, steps=steps)
            key = f"video {vp} + images {ip}, {kind} {step_ms:.0f} ms"
            res["data_wait"][key] = r
            print(f"data wait {key}: {r}", flush=True)
            save()
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return res


def format_table(res: dict) -> str:
    lines = [f"{res['device']}, torch {res['torch']} (CUDA {res['cuda']}), DALI {res['dali']}, {res['cpus']} CPUs, "
             f"{res['date']}", f"frame indices (NVDEC, 16x8 recipe, clip + 112 copy + PyAV): {res.get('frame_indices')}"]
    for name, v in res.get("pixels", {}).items():
        lines.append(f"pixels {name}: {v}")
    lines.append(f"broken files: {res.get('robustness')}")
    lines.append("throughput (full pretraining augmentation)")
    for k, v in res.get("throughput", {}).items():
        unit = "clips/s" if k.startswith("video") else "images/s"
        lines.append(f"  {k:<22} {v} {unit}")
    lines.append("data wait per step (video batch 8 + image batch 64)")
    for k, v in res.get("data_wait", {}).items():
        lines.append(f"  {k:<22} {v}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("BEVT_DALI_BENCH_DATA",
                                                         os.path.join(tempfile.gettempdir(), "bevt_dali_bench")),
                   help="where the synthetic benchmark data is written (reused when present)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="fewer batches and providers")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        p.error(f"unknown or no section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to measure", file=sys.stderr)
        return 2
    res = run_all(args.data, quick=args.quick, out=args.out, sections=sections)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
