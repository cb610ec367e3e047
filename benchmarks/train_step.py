"""The BEVT training step at Swin-B shapes: fast path vs reference path, phases, MFU (issue 9).

Used by ``benchmarks/test_train_step.py`` and runnable on its own (``python benchmarks/train_step.py``),
which prints the tables that RESULTS.md records.

* **reference path**: every op on its PyTorch reference (``BEVT_KERNELS=ref``: eager window attention,
  gather-first masked CE, numpy masks), the tokenizer as the official code runs it (DALL-E convs in
  fp16), bf16 autocast, fused AdamW.
* **fast path**: ``auto`` backends (Triton attention and CE, CUDA masks), the Swin blocks compiled
  (``compile_blocks``, what ``run.compile=true`` does in training), the tokenizer compiled (torch.compile
  fuses its element-wise work between cuDNN convs) with cuDNN autotuning, the same autocast and optimizer.

Inputs are random uint8 frames already on the GPU (decoding is measured by the DALI benchmark); the
DALL-E encoder has random weights (the published weights cannot be downloaded here; speed does not
depend on them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field

import torch

try:
    from benchmarks.timing import cuda_time_ms, kernel_times_ms
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from timing import cuda_time_ms, kernel_times_ms
from bevt.data.transforms import normalize
from bevt.models import compile_blocks
from bevt.models.bevt import create_bevt
from bevt.ops import BlockMaskSpec, TubeSpec, step_masks, use_backend
from bevt.tokenizers import DalleEncoder, DalleTokenizer
from bevt.train.optim import build_optimizer, param_groups

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, datasheet (the measured matmul ceiling is ~780)


@dataclass
class StepBench:
    path: str  # "fast" | "ref"
    clips: int
    images: int
    model: torch.nn.Module
    tokenizer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    inputs: dict
    frames: int = 16
    step_count: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def backends(self):
        return use_backend("ref") if self.path == "ref" else contextlib.nullcontext()

    def _tokens(self, x):
        with torch.autocast("cuda", enabled=False):
            return self.tokenizer.encode(x)

    def run(self, phases: dict | None = None) -> None:
        """One full optimizer step. With ``phases``, time each phase with CUDA events (the streams then
        run their backward passes separately: the same gradients, attributable time)."""
        ev = {}

        def mark(name):
            if phases is not None:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                ev[name] = e

        m, x = self.model, self.inputs
        B, T = self.clips, self.frames
        grid = BlockMaskSpec().grid
        with self.backends:
            mark("start")
            ids_v = self._tokens(x["video_tok"].flatten(0, 1)).view(B, T, *grid) if B else None
            ids_i = self._tokens(x["images_tok"]) if self.images else None
            mark("tokenizer")
            vin, vtgt, imask = step_masks(B, self.images, BlockMaskSpec(), TubeSpec(), seed=0, step=self.step_count,
                                          device="cuda")
            mark("masks")
            total = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if B:
                    video = normalize(x["video"], channel_dim=1)
                    hv = m.encode_video(video, vin)
                    lv, _ = m._stream_loss(hv, vtgt, ids_v, "video")
                    total = lv
            mark("video_fwd")
            if phases is not None and B:
                lv.backward()
                total = None
            mark("video_bwd")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if self.images:
                    images = normalize(x["images"], channel_dim=1)
                    hi = m.encode_images(images, imask)
                    li, _ = m._stream_loss(hi, imask, ids_i, "image")
                    total = li if total is None else total + li
            mark("image_fwd")
            total.backward()
            mark("image_bwd")
            torch.nn.utils.clip_grad_norm_(m.parameters(), 3.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        self.step_count += 1
        if phases is not None:
            torch.cuda.synchronize()
            names = list(ev)
            for a, b in zip(names, names[1:]):
                phases[b] = phases.get(b, 0.0) + ev[a].elapsed_time(ev[b])


def build(path: str, clips: int, images: int, *, model_name: str = "videoswin_base_patch244_window877",
          frames: int = 16, size: int = 224, seed: int = 0) -> StepBench:
    if path not in ("fast", "ref"):
        raise ValueError(f"path must be 'fast' or 'ref', got {path!r}")
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = path == "fast"
    model = create_bevt(model_name, mode="bevt" if clips and images else ("bevt_v" if clips else "bevt_i"),
                        vocab_size=8192, drop_path_rate=0.3).to(dev)
    if path == "fast":
        compile_blocks(model)
    opt = build_optimizer(param_groups(model, weight_decay=0.05, no_decay_keys=("relative_position_bias_table",
                                                                                  "norm")),
                          lr=5e-4, device_type="cuda")
    # reference: fp16 convs as DALL-E's own code; fast: the same, compiled (fused element-wise work)
    tok = DalleTokenizer(DalleEncoder(), compile=path == "fast").to(dev).to(memory_format=torch.channels_last)
    g = torch.Generator(device=dev).manual_seed(seed)
    s = size // 2

    def u8(*shape):
        return torch.randint(0, 256, shape, device=dev, dtype=torch.uint8, generator=g)

    inputs = {"video": u8(clips, 3, frames, size, size), "video_tok": u8(clips, frames, 3, s, s),
              "images": u8(images, 3, size, size), "images_tok": u8(images, 3, s, s)}
    return StepBench(path, clips, images, model, tok, opt, inputs, frames)


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def step_flops(sb: StepBench) -> float:
    """Matrix FLOPs of one step (forward + backward of the model, tokenizer forward), counted by torch on
    the reference path (the same for both paths). Give it an eager StepBench: the fast path's compiled
    blocks would recompile for the reference ops."""
    from torch.utils.flop_counter import FlopCounterMode

    if sb.path != "ref":
        raise ValueError("count the FLOPs on the reference path's StepBench (the fast one is compiled)")
    with use_backend("ref"), FlopCounterMode(display=False) as fc:
        sb.run()
    return float(fc.get_total_flops())


KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    ("attention (Triton)", ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dbias_kernel", "_bwd_dkdv_kernel",
                            "_table_grad_kernel")),
    ("masked CE (Triton)", ("_prep_kernel", "_logits_kernel", "_ce_rows_kernel", "_grad_kernel", "_final_kernel",
                            "_scale_kernel")),
    ("conv (cuDNN)", ("conv", "cudnn", "implicit_gemm", "xmma_fprop", "dgrad", "wgrad", "fprop", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "splitk")),
    ("layer norm", ("layer_norm", "LayerNorm")),
    ("softmax / reductions", ("softmax", "reduce", "argmax", "max_pool", "norm_kernel")),
    ("optimizer", ("adam", "Adam", "multi_tensor")),
    ("copies / layout", ("copy", "cat", "transpose", "permute", "roll", "index", "gather", "scatter", "pad")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "triton_poi", "triton_red", "triton_per", "fill")),
)


def kernel_kind(name: str) -> str:
    for kind, keys in KERNEL_KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def kernel_profile(step, steps: int = 2, top: int = 25) -> dict:
    """GPU time per call of ``step()`` by kernel and by kind (torch.profiler), to see where a step goes."""
    kernels = kernel_times_ms(step, calls=steps)
    kinds: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_ms_per_step": sum(v[0] for v in kernels.values()),
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "ms": v[0], "calls": v[1]} for n, v in rows]}


def measure(path: str, clips: int, images: int, *, phases: bool = True, iters: int = 10,
            flops: float | None = None) -> dict:
    """One path at one shape. ``flops``: the step's FLOPs for the MFU (counted here on the reference path)."""
    sb = build(path, clips, images)
    ms = cuda_time_ms(sb.run, warmup=3, rep=iters)
    row = {"path": path, "clips": clips, "images": images, "step_ms": ms,
           "clips_per_s": clips / ms * 1e3, "images_per_s": images / ms * 1e3, "peak_gb": peak_gb(sb.run)}
    if phases:
        ph: dict[str, float] = {}
        for _ in range(3):
            sb.run(ph)
        row["phases_ms"] = {k: v / 3 for k, v in ph.items()}
        row["kernels"] = kernel_profile(sb.run)
    flops = step_flops(sb) if flops is None else flops
    row["tflops_per_step"] = flops / 1e12
    row["mfu"] = flops / (ms / 1e3) / (H100_BF16_PEAK_TFLOPS * 1e12)
    del sb
    torch.cuda.empty_cache()
    return row


def video_stream_vs_torchvision(clips: int = 8, iters: int = 10) -> dict:
    """Video Swin-B train step (video stream alone, classification loss) vs torchvision's swin3d_b, each
    eager and compiled (bevt: its blocks, as training does; torchvision: ``torch.compile`` of the model)."""
    from torchvision.models.video import swin3d_b

    from bevt.models import create_model

    dev = torch.device("cuda")
    x = torch.randn(clips, 3, 16, 224, 224, device=dev)
    out = {}
    for name, make in (("bevt", lambda: create_model("videoswin_base_patch244_window877", num_classes=400)),
                       ("torchvision_swin3d_b", lambda: swin3d_b())):
        for compiled in (False, True):
            m = make().to(dev)
            if compiled and name == "bevt":
                compile_blocks(m)
            elif compiled:
                m = torch.compile(m)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(x)
                y.float().logsumexp(-1).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = cuda_time_ms(step, warmup=3, rep=iters)
            out[f"{name}_{'compiled' if compiled else 'eager'}"] = {
                "step_ms": ms, "clips_per_s": clips / ms * 1e3, "peak_gb": peak_gb(step)}
            del m, opt
            torch.cuda.empty_cache()
    fast = out["bevt_compiled"]["clips_per_s"]
    out["speedup_vs_eager"] = fast / out["torchvision_swin3d_b_eager"]["clips_per_s"]
    out["speedup_vs_compiled"] = fast / out["torchvision_swin3d_b_compiled"]["clips_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--shapes", default="4x32,8x64", help="clips x images per step, comma-separated ('' for none)")
    ap.add_argument("--no-video-stream", action="store_true", help="skip the video-stream step vs torchvision")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "steps": []}
    for shape in filter(None, args.shapes.split(",")):
        c, i = (int(v) for v in shape.split("x"))
        flops = None
        for path in ("ref", "fast"):  # the reference first: it counts the FLOPs
            row = measure(path, c, i, flops=flops)
            flops = row["tflops_per_step"] * 1e12
            res["steps"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    if not args.no_video_stream:
        res["video_stream"] = video_stream_vs_torchvision()
        print(json.dumps(res["video_stream"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
