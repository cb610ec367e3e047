"""The BEVT training step at Swin-B shapes: fast path vs reference path, phases, MFU (issue 9).

Used by ``benchmarks/test_train_step.py`` and runnable on its own (``python benchmarks/train_step.py``),
which prints the tables that RESULTS.md records.

* **reference path**: every op on its PyTorch reference (``BEVT_KERNELS=ref``: eager window attention,
  gather-first masked CE, numpy masks), the tokenizer as the official code runs it (DALL-E convs in
  fp16), bf16 autocast, fused AdamW.
* **fast_eager path**: ``auto`` backends (Triton attention and CE, CUDA masks), the Swin blocks compiled
  (``compile_blocks``, what ``run.compile=true`` does in training), the tokenizer compiled (torch.compile
  fuses its element-wise work between cuDNN convs) with cuDNN autotuning, the same autocast and optimizer,
  launched from Python every step.
* **fast path**: the same, with each step's forward (tokenizer included) and backward replayed from CUDA
  graphs (:class:`bevt.train.cuda_graph.GraphedStep`, what ``run.cuda_graph=true`` does in training).

Both paths run :class:`bevt.train.pretrain.PretrainForward`, the step ``bevt pretrain`` runs.

Inputs are random uint8 frames already on the GPU (decoding is measured by the DALI benchmark); the
DALL-E encoder has random weights (the published weights cannot be downloaded here; speed does not
depend on them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass

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
from bevt.train.cuda_graph import GraphedStep
from bevt.train.optim import build_optimizer, param_groups
from bevt.train.pretrain import PretrainForward, mask_bounds

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, datasheet (the measured matmul ceiling is ~780)


@dataclass
class StepBench:
    path: str  # see PATHS
    clips: int
    images: int
    model: torch.nn.Module
    forward: torch.nn.Module  # bevt.train.pretrain.PretrainForward: tokenizer, both streams, losses
    step_fn: object  # ``forward`` itself, or a GraphedStep of it (path "fast")
    optimizer: torch.optim.Optimizer
    inputs: dict
    frames: int = 16
    step_count: int = 0
    sync_grads: object = None  # under torchrun with AllReduceParallel: its all-reduce, after the backward

    @property
    def backends(self):
        return use_backend("ref") if self.path == "ref" else contextlib.nullcontext()

    @property
    def graphed(self) -> bool:
        return isinstance(self.step_fn, GraphedStep)

    def run(self, phases: dict | None = None) -> None:
        """One full optimizer step, as ``bevt pretrain`` runs it. With ``phases``, time each phase with CUDA
        events: eager paths are split finely (tokenizer, each stream's forward and backward: the same
        gradients, attributable time), the graphed path into its forward and backward replays."""
        ev = {}

        def mark(name):
            if phases is not None:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                ev[name] = e

        x, B = self.inputs, self.clips
        with self.backends:
            mark("start")
            vin, vtgt, imask = step_masks(B, self.images, BlockMaskSpec(), TubeSpec(), seed=0, step=self.step_count,
                                          device="cuda")
            mark("masks")
            if phases is None or self.graphed:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = self.step_fn(x["video"], x["video_tok"], vin, vtgt, x["images"], x["images_tok"], imask)
                mark("forward (graph)" if self.graphed else "forward")
                out["loss"].backward()
                mark("backward (graph)" if self.graphed else "backward")
            else:
                self._run_phases(x, vin, vtgt, imask, mark)
            if self.sync_grads is not None:
                self.sync_grads()
                mark("gradient all-reduce")
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 3.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        self.step_count += 1
        if phases is not None:
            torch.cuda.synchronize()
            names = list(ev)
            for a, b in zip(names, names[1:]):
                phases[b] = phases.get(b, 0.0) + ev[a].elapsed_time(ev[b])

    def _run_phases(self, x, vin, vtgt, imask, mark) -> None:
        """The forward of PretrainForward taken apart, each stream's backward run on its own."""
        m, f, B, T = self.model, self.forward, self.clips, self.frames
        ids_v = f._tokens(x["video_tok"].flatten(0, 1)).view(B, T, *f.grid) if B else None
        ids_i = f._tokens(x["images_tok"]) if self.images else None
        mark("tokenizer")
        streams = []
        if B:
            streams.append(("video", lambda: m.encode_video(normalize(x["video"], channel_dim=1), vin), vtgt, ids_v))
        if self.images:
            streams.append(("image", lambda: m.encode_images(normalize(x["images"], channel_dim=1), imask), imask,
                            ids_i))
        for name, encode, target_mask, ids in streams:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = m._stream_loss(encode(), target_mask, ids, name)
            mark(f"{name}_fwd")
            loss.backward()
            mark(f"{name}_bwd")


PATHS = {  # name -> (kernels, compile blocks and tokenizer, CUDA graphs)
    "ref": ("ref", False, False),
    "fast_eager": ("auto", True, False),  # the fast path launched from Python (run.compile=true)
    "fast": ("auto", True, True),  # ... replayed from CUDA graphs (run.compile=true run.cuda_graph=true)
}


def build(path: str, clips: int, images: int, *, model_name: str = "videoswin_base_patch244_window877",
          frames: int = 16, size: int = 224, seed: int = 0) -> StepBench:
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    _, compiled, graphs = PATHS[path]
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = compiled
    model = create_bevt(model_name, mode="bevt" if clips and images else ("bevt_v" if clips else "bevt_i"),
                        vocab_size=8192, drop_path_rate=0.3).to(dev)
    if compiled:
        compile_blocks(model)
    opt = build_optimizer(param_groups(model, weight_decay=0.05, no_decay_keys=("relative_position_bias_table",
                                                                                  "norm")),
                          lr=5e-4, device_type="cuda")
    # reference: fp16 convs as DALL-E's own code; fast: the same, compiled (fused element-wise work)
    tok = DalleTokenizer(DalleEncoder(), compile=compiled).to(dev).to(memory_format=torch.channels_last)
    forward = PretrainForward(model, tok, BlockMaskSpec().grid, mask_bounds(BlockMaskSpec(), TubeSpec()))
    step_fn = GraphedStep(forward, amp_dtype=torch.bfloat16) if graphs else forward
    g = torch.Generator(device=dev).manual_seed(seed)
    s = size // 2

    def u8(*shape):
        return torch.randint(0, 256, shape, device=dev, dtype=torch.uint8, generator=g)

    inputs = {"video": u8(clips, 3, frames, size, size) if clips else None,
              "video_tok": u8(clips, frames, 3, s, s) if clips else None,
              "images": u8(images, 3, size, size) if images else None,
              "images_tok": u8(images, 3, s, s) if images else None}
    return StepBench(path, clips, images, model, forward, step_fn, opt, inputs, frames)


def with_peak_memory(fn):
    """``fn()`` -> (its result, peak GB allocated, peak GB reserved) while it ran.

    Give it the first calls of a step too (compilation, and for a graphed step the capture): a CUDA graph's
    memory is allocated while it is captured and reused by every replay without new allocations, so
    measuring replays alone would miss it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 2 ** 30, torch.cuda.max_memory_reserved() / 2 ** 30


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
                            "_bwd_window_kernel", "_table_grad_kernel")),
    ("masked CE (Triton)", ("_prep_kernel", "_gather_kernel", "_logits_kernel", "_ce_rows_kernel", "_grad_kernel",
                            "_final_kernel", "_scale_kernel")),
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
    ms, peak, reserved = with_peak_memory(lambda: cuda_time_ms(sb.run, warmup=3, rep=iters))
    row = {"path": path, "clips": clips, "images": images, "step_ms": ms,
           "clips_per_s": clips / ms * 1e3, "images_per_s": images / ms * 1e3, "peak_gb": peak,
           "reserved_gb": reserved}
    if phases:
        ph: dict[str, float] = {}
        for _ in range(3):
            sb.run(ph)
        row["phases_ms"] = {k: v / 3 for k, v in ph.items()}
        row["kernels"] = kernel_profile(sb.run)
    flops = step_flops(sb) if flops is None else flops
    row["tflops_per_step"] = flops / 1e12
    row["mfu"] = flops / (ms / 1e3) / (H100_BF16_PEAK_TFLOPS * 1e12)
    sb = None  # frees the step's memory (the closures above keep the name)
    torch.cuda.empty_cache()
    return row


VIDEO_STREAM_VARIANTS = ("bevt_eager", "bevt_compiled", "bevt_graphed", "torchvision_swin3d_b_eager",
                         "torchvision_swin3d_b_compiled")


def video_stream_vs_torchvision(clips: int = 8, iters: int = 10, variants=VIDEO_STREAM_VARIANTS) -> dict:
    """Video Swin-B train step (video stream alone, 400-way CE) vs torchvision's swin3d_b: bevt eager, its
    blocks compiled (``run.compile``), and compiled + CUDA graphs (``run.cuda_graph``, as ``bevt finetune``
    runs it); torchvision eager and ``torch.compile`` of the whole model."""
    from torchvision.models.video import swin3d_b

    from bevt.models import create_model
    from bevt.train.finetune import FinetuneForward

    dev = torch.device("cuda")
    x = torch.randn(clips, 3, 16, 224, 224, device=dev)
    y = torch.randint(0, 400, (clips,), device=dev)
    out = {}
    for variant in variants:
        if variant.startswith("bevt"):
            m = create_model("videoswin_base_patch244_window877", num_classes=400).to(dev)
            if variant != "bevt_eager":
                compile_blocks(m)
        else:
            m = swin3d_b().to(dev)
            if variant.endswith("compiled"):
                m = torch.compile(m)
        fwd = FinetuneForward(m)
        step_fn = GraphedStep(fwd, amp_dtype=torch.bfloat16) if variant == "bevt_graphed" else fwd
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(x, y)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms, peak, _ = with_peak_memory(lambda: cuda_time_ms(step, warmup=3, rep=iters))
        out[variant] = {"step_ms": ms, "clips_per_s": clips / ms * 1e3, "peak_gb": peak}
        m = fwd = step_fn = opt = None  # free the variant's memory before the next one
        torch.cuda.empty_cache()
    best = max((v["clips_per_s"], k) for k, v in out.items() if k.startswith("bevt"))
    out["bevt_best"] = best[1]
    for tv in ("eager", "compiled"):
        if f"torchvision_swin3d_b_{tv}" in out:
            out[f"speedup_vs_{tv}"] = best[0] / out[f"torchvision_swin3d_b_{tv}"]["clips_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--shapes", default="4x32,8x64", help="clips x images per step, comma-separated ('' for none)")
    ap.add_argument("--paths", default="ref,fast_eager,fast", help=f"step paths, comma-separated ({', '.join(PATHS)})")
    ap.add_argument("--no-video-stream", action="store_true", help="skip the video-stream step vs torchvision")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "steps": []}
    for shape in filter(None, args.shapes.split(",")):
        c, i = (int(v) for v in shape.split("x"))
        flops = None
        paths = args.paths.split(",")
        for path in sorted(paths, key=lambda p: p != "ref"):  # the reference first: it counts the FLOPs
            if flops is None and path != "ref":
                flops = step_flops(build("ref", c, i))
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
