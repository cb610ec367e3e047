"""The BEVT step under torchrun: DDP launched from Python vs one gradient all-reduce per step + CUDA graphs.

    torchrun --nproc_per_node 2 benchmarks/train_step_ddp.py [--shape 8x64] [--out FILE]

Each process runs the Swin-B step of ``benchmarks/train_step.py`` (its ``fast_eager`` and ``fast`` paths) on
its own GPU with the per-GPU batch given:

* **fast_eager + DDP**: Triton/CUDA kernels, Swin blocks compiled (``run.compile=true``), the model in
  DistributedDataParallel (gradient all-reduce from backward hooks, overlapped with the backward), launched
  from Python every step: what a torchrun job ran before ``run.data_parallel`` existed.
* **fast + allreduce**: the same step replayed from CUDA graphs, then one bucketed all-reduce of the
  gradients (:class:`bevt.train.distributed.AllReduceParallel`): what ``run.compile=true
  run.cuda_graph=true`` does under torchrun.

Prints one JSON row per path (the median step of each process, and the slowest process's), and writes
them to ``--out``. Needs one CUDA GPU per process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cuda_time_ms  # noqa: E402
from train_step import build  # noqa: E402

from bevt.train.distributed import AllReduceParallel, all_gather_objects, cleanup, init_distributed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8x64", help="clips x images per GPU")
    ap.add_argument("--paths", default="fast_eager,fast")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_step_ddp.py needs CUDA GPUs (one per torchrun process)")
    info = init_distributed("cuda")
    clips, images = (int(v) for v in args.shape.split("x"))
    rows = []
    for path in args.paths.split(","):
        sb = build(path, clips, images)
        if info.enabled:
            if path == "fast":
                wrapper = AllReduceParallel(sb.model, info)
                sb.sync_grads = wrapper.sync_grads
            else:
                wrapper = torch.nn.parallel.DistributedDataParallel(sb.model, device_ids=[info.local_rank])
            sb.forward.model = wrapper  # the step runs the wrapped model (graphs capture on first call)
        t0 = time.time()
        ms = cuda_time_ms(sb.run, warmup=3, rep=args.iters)
        per_rank = all_gather_objects(ms, info)
        row = {"path": path, "processes": info.world_size, "clips_per_gpu": clips, "images_per_gpu": images,
               "step_ms": per_rank[0], "step_ms_per_process": per_rank, "slowest_ms": max(per_rank),
               "clips_per_s": clips * info.world_size / max(per_rank) * 1e3,
               "images_per_s": images * info.world_size / max(per_rank) * 1e3,
               "first_calls_s": time.time() - t0, "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        if info.is_main:
            print(json.dumps(row), flush=True)
        del sb
        torch.cuda.empty_cache()
    if info.is_main and args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    cleanup(info)


if __name__ == "__main__":
    main()
