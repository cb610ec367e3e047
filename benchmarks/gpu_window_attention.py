"""GPU development script for the Triton window-attention kernels (one call does everything).

1. correctness on every real shape (token and windowed layouts, shifted/unshifted, padded, clamped, image
   path, 16x7x7 windows, head dim 64, fp16, fp32): output and gradients (qkv, table, kv_pad) against the
   reference computed in fp32 and in the input dtype; kernels are compiled in parallel worker processes;
2. determinism of the backward (bitwise, twice);
3. an optional sweep of launch configurations (``--sweep``);
4. default choices against their alternatives: skipping the tiles the temporal shift mask leaves fully
   masked, on and off, at the fine-tuning shape; the register caps of the forward and dQ;
5. per-kernel times (torch.profiler) and fwd / bwd / fwd+bwd medians of the token entry point for the
   Swin-B stages (8 clips) against the eager reference, plus extra memory.

Prints a short table last; writes everything to $OUT/window_attention_gpu.json (or ./ without $OUT).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_window_attention.py [--sweep] [--workers 12] [--skip-check]

``--offline-compile`` needs no GPU: it compiles every kernel of the correctness cases, of step 4's
alternatives (and of the sweep's configurations) for sm_90 with the launchers' own specs and prints
registers and spills from ptxas.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from shapes import SWIN_B_FINETUNE_STAGE1, SWIN_B_IMAGE_STAGES, SWIN_B_STAGES  # noqa: E402
from timing import cuda_time_ms, graph_time_ms  # noqa: E402


# ----------------------------------------------------------------------------- cases
def _stage_case(s, shifted: bool, **kw):
    from bevt.models.video_swin import get_window_size

    ws, ss = get_window_size(s.grid, s.window, tuple(w // 2 for w in s.window) if shifted else (0, 0, 0))
    return dict(name=f"{s.name}{'_shift' if shifted else ''}", batch=s.batch, grid=s.grid, heads=s.heads,
                d=s.head_dim, window=ws, shift=ss, mask=ss, table=s.window, **kw)


def _image_case(s, shifted: bool):
    """The image stream (official quirk: 7x7 windows, the half-window mask in every block)."""
    return dict(name=f"{s.name}{'_shift' if shifted else ''}", batch=s.batch, grid=s.grid, heads=s.heads,
                d=s.head_dim, window=(1, 7, 7), shift=(0, 3, 3) if shifted else (0, 0, 0), mask=(0, 3, 3),
                table=s.window)


def correctness_cases():
    cases = []
    for s in SWIN_B_STAGES:
        cases.append(_stage_case(s, False))
        if s.name != "stage4":
            cases.append(_stage_case(s, True))
    for s in SWIN_B_IMAGE_STAGES:
        cases += [_image_case(s, False), _image_case(s, True)]
    cases += [
        dict(name="img_stage4_quirk", batch=64, grid=(1, 7, 7), heads=32, d=32, window=(1, 7, 7), shift=(0, 0, 0),
             mask=(0, 3, 3), table=(8, 7, 7)),
        dict(name="w16_shift", batch=2, grid=(16, 28, 28), heads=8, d=32, window=(16, 7, 7), shift=(0, 3, 3),
             mask=(0, 3, 3), table=(16, 7, 7)),
        dict(name="padded_192px_shift", batch=2, grid=(8, 48, 48), heads=4, d=32, window=(8, 7, 7),
             shift=(0, 3, 3), mask=(0, 3, 3), table=(8, 7, 7)),
        dict(name="clamped_4x6x6", batch=3, grid=(4, 6, 6), heads=8, d=32, window=(4, 6, 6), shift=(0, 0, 0),
             mask=(0, 0, 0), table=(8, 7, 7)),
        dict(name="d64_shift_t", batch=2, grid=(16, 28, 28), heads=4, d=64, window=(8, 7, 7), shift=(4, 3, 3),
             mask=(4, 3, 3), table=(8, 7, 7)),
        dict(name="stage2_fp16", batch=8, grid=(8, 28, 28), heads=8, d=32, window=(8, 7, 7), shift=(0, 3, 3),
             mask=(0, 3, 3), table=(8, 7, 7), dtype="float16"),
        dict(name="stage3_fp32", batch=2, grid=(8, 14, 14), heads=16, d=32, window=(8, 7, 7), shift=(0, 3, 3),
             mask=(0, 3, 3), table=(8, 7, 7), dtype="float32"),
        dict(name="stage1_windowed", batch=8, grid=(8, 56, 56), heads=4, d=32, window=(8, 7, 7), shift=(0, 3, 3),
             mask=(0, 3, 3), table=(8, 7, 7), windowed=True),
    ]
    return cases


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_inputs(c, dtype, seed=0, device=DEVICE):
    from bevt.ops.window_attention import table_length

    g = torch.Generator(device="cpu").manual_seed(seed)
    B, (D, H, W), nh, d = c["batch"], c["grid"], c["heads"], c["d"]
    qkv = torch.randn(B, D, H, W, 3, nh, d, generator=g).to(device, dtype)
    table = (torch.randn(table_length(c["table"]), nh, generator=g) * 0.5).to(device)
    kv_pad = torch.randn(2, nh, d, generator=g).to(device)
    do = torch.randn(B, D, H, W, nh, d, generator=g).to(device, dtype)
    return qkv, table, kv_pad, do


def run_tokens(c, qkv, table, kv_pad, do, backend):
    from bevt.ops.window_attention import window_attention_tokens

    qkv, table, kv_pad = (t.detach().clone().requires_grad_(True) for t in (qkv, table, kv_pad))
    o = window_attention_tokens(qkv, table, window_size=c["window"], shift_size=c["shift"],
                                table_window_size=c["table"], kv_pad=kv_pad, mask_shift_size=c["mask"],
                                backend=backend)
    o.backward(do)
    return o.detach(), qkv.grad, table.grad, kv_pad.grad


def run_windowed(c, qkv, table, kv_pad, do, backend):
    """Windowed entry on the same problem (grid must be a window multiple): roll + partition outside."""
    from bevt.ops.window_attention import partition_windows, reverse_windows, window_attention

    ws, ss = c["window"], c["shift"]
    qkv, table = (t.detach().clone().requires_grad_(True) for t in (qkv, table))
    B = qkv.shape[0]
    x = torch.roll(qkv, shifts=tuple(-s for s in ss), dims=(1, 2, 3)) if any(ss) else qkv
    q, k, v = (partition_windows(t, ws).transpose(1, 2) for t in x.unbind(4))
    ow = window_attention(q, k, v, table, window_size=ws, table_window_size=c["table"], padded_grid=c["grid"],
                          mask_shift_size=c["mask"], backend=backend)
    o = reverse_windows(ow.transpose(1, 2), ws, B, c["grid"])
    o = torch.roll(o, shifts=tuple(ss), dims=(1, 2, 3)) if any(ss) else o
    o.backward(do)
    return o.detach(), qkv.grad, table.grad, torch.zeros_like(kv_pad)


NAMES = ("out", "dqkv", "dtable", "dkv_pad")


def check_case(c):
    """Errors of triton and of the same-dtype reference against the fp32 (fp64 for fp32 inputs) reference."""
    torch.manual_seed(0)
    dtype = getattr(torch, c.get("dtype", "bfloat16"))
    run = run_windowed if c.get("windowed") else run_tokens
    qkv, table, kv_pad, do = make_inputs(c, dtype)
    t0 = time.time()
    tri = run(c, qkv, table, kv_pad, do, "triton")
    _sync()
    first_s = time.time() - t0
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref_hi = run(c, qkv.to(hi), table.to(hi), kv_pad.to(hi), do.to(hi), "ref")
    ref_lo = run(c, qkv, table, kv_pad, do, "ref") if dtype != torch.float32 else None
    rows = {}
    for name, a, b, lo in zip(NAMES, tri, ref_hi, ref_lo or (None,) * 4):
        if b is None:
            continue
        b = b.double()
        err = (a.double() - b).abs()
        row = dict(max=err.max().item(), mean=err.mean().item(), scale=b.abs().max().item(),
                   finite=bool(torch.isfinite(a).all()))
        if lo is not None:
            elo = (lo.double() - b).abs()
            row.update(ref_max=elo.max().item(), ref_mean=elo.mean().item())
        rows[name] = row
    ok = True
    for name, row in rows.items():
        if not row["finite"]:
            ok = False
        elif "ref_max" in row:
            lim = 2.0 if name == "out" else 3.0
            # the rule of the tests: kernel error <= lim x the same-dtype reference error (max and mean)
            if row["max"] > lim * row["ref_max"] + 1e-6 or row["mean"] > lim * row["ref_mean"] + 1e-7:
                ok = False
        elif row["max"] > 2e-4 * max(row["scale"], 1.0):
            ok = False
    return dict(case=c["name"], ok=ok, first_call_s=first_s, errors=rows)


def _worker(cases):
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    return [check_case(c) for c in cases]


# ----------------------------------------------------------------------------- timing
def attn_flops(c, n_windows):
    n = math.prod(c["window"])
    return 4 * n_windows * c["heads"] * n * n * c["d"]  # forward: two matrix products


def bench_case(c, backend, modes=("fwd", "bwd", "fwd_bwd")):
    from bevt.ops.window_attention import window_attention_tokens

    qkv, table, kv_pad, do = make_inputs(c, torch.bfloat16)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    kv_pad.requires_grad_(True)

    def fwd():
        return window_attention_tokens(qkv, table, window_size=c["window"], shift_size=c["shift"],
                                       table_window_size=c["table"], kv_pad=kv_pad, mask_shift_size=c["mask"],
                                       backend=backend)

    out = {}
    if "fwd" in modes:
        with torch.no_grad():
            out["fwd"] = cuda_time_ms(fwd)
    if "bwd" in modes:
        o = fwd()
        out["bwd"] = cuda_time_ms(lambda: torch.autograd.grad(o, (qkv, table, kv_pad), do, retain_graph=True,
                                                                  allow_unused=True))
        del o
    if "fwd_bwd" in modes:
        out["fwd_bwd"] = cuda_time_ms(lambda: torch.autograd.grad(fwd(), (qkv, table, kv_pad), do, allow_unused=True))
        if backend == "triton":  # GPU time without host launch overhead (the op has no host sync)
            out["fwd_bwd_graph"] = graph_time_ms(
                lambda: torch.autograd.grad(fwd(), (qkv, table, kv_pad), do, allow_unused=True))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fwd(), (qkv, table, kv_pad), do, allow_unused=True)
        torch.cuda.synchronize()
        # extra = peak above the inputs, minus the unavoidable outputs (o and the three gradients)
        outputs = (qkv.numel() + do.numel()) * 2 + table.numel() * 4 + kv_pad.numel() * 4
        out["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out["extra_beyond_outputs_MiB"] = (torch.cuda.max_memory_allocated() - base - outputs) / 2 ** 20
    return out


def profile_kernels(c):
    """Per-kernel device times of one fwd+bwd (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from bevt.ops.window_attention import window_attention_tokens

    qkv, table, kv_pad, do = make_inputs(c, torch.bfloat16)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    kv_pad.requires_grad_(True)

    def step():
        o = window_attention_tokens(qkv, table, window_size=c["window"], shift_size=c["shift"],
                                    table_window_size=c["table"], kv_pad=kv_pad, mask_shift_size=c["mask"],
                                    backend="triton")
        torch.autograd.grad(o, (qkv, table, kv_pad), do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0):
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if t:
                rows[ev.key[:60]] = t / 10 / 1000  # ms per step
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def sweep_configs():
    from bevt.kernels.window_attention import GPU_CONFIG as G

    r = dataclasses.replace
    kernels = ("fwd", "dq", "db", "kv")
    every = lambda field, v: {f"{k}_{field}": v for k in kernels}  # noqa: E731
    one = lambda **kw: r(G, **kw)  # noqa: E731
    return {
        "default": G,
        # measured at earlier defaults (sessions 7-13) and not paying then: all caps, stages, tile shapes
        "reg168": r(G, **every("maxnreg", 168)),
        "stages3": r(G, **every("stages", 3)),
        "bn128": r(G, fwd_bn=128, dq_bn=128, kv_bm=128),  # fewer, larger key (query) steps
        "bm128w8": r(G, fwd_bm=128, fwd_warps=8, dq_bm=128, dq_warps=8, kv_bn=128, kv_warps=8),
        # session 15: one kernel at a time, at the session-13 caps (each kernel's pipelining depth and grid)
        "fwd_stages3": one(fwd_stages=3), "dq_stages3": one(dq_stages=3), "db_stages3": one(db_stages=3),
        "kv_stages3": one(kv_stages=3), "fwd_stages1": one(fwd_stages=1),
        "prog512": r(G, **every("programs", 512)), "prog2048": r(G, **every("programs", 2048)),
        "prog4096": r(G, **every("programs", 4096)),
        "db_prog1024": one(db_programs=1024), "db_prog4096": one(db_programs=4096),
        "kv_prog2048": one(kv_programs=2048), "fwd_prog2048": one(fwd_programs=2048),
    }


def ab_tests():
    """Default launch choices against their alternatives, each at the shape it matters for: {test: (case,
    {variant: Config})}, the default first.

    - skipping the tiles the temporal shift mask leaves fully masked, on and off, at the fine-tuning shape
      (D = 16: two windows along D, the shift of 4 live; the pretraining grid has one window along D);
    - the register caps of 128 for the forward and dQ (4 CTAs per SM) against 168 for all four kernels;
    - the programs per kernel of session 15 against those of session 13 (windows per program);
    - the one-tile backward (image path) without a cap (206 registers, 2 CTAs) against 168 (3 CTAs; 48 bytes
      of spills since session 11, 476 when it was last timed) and 128 (4 CTAs; 84 bytes).
    """
    from bevt.kernels.window_attention import GPU_CONFIG as base

    alt = dataclasses.replace
    caps = dict(fwd_dq_128=base, all_168=alt(base, fwd_maxnreg=168, dq_maxnreg=168))
    grid = dict(s15=base, s13=alt(base, fwd_programs=1024, dq_programs=1024, db_programs=2048, kv_programs=1024,
                                  win_programs=1024))
    return {
        "launch_grid_stage1": (_stage_case(SWIN_B_STAGES[0], True), grid),
        "launch_grid_stage3": (_stage_case(SWIN_B_STAGES[2], True), grid),
        "launch_grid_stage4": (_stage_case(SWIN_B_STAGES[3], False), grid),
        "launch_grid_img_stage3": (_image_case(SWIN_B_IMAGE_STAGES[1], True), grid),
        "masked_tile_skip": (_stage_case(SWIN_B_FINETUNE_STAGE1, True),
                             dict(skip=base, every_tile=alt(base, skip_masked_tiles=False))),
        "register_caps_stage1": (_stage_case(SWIN_B_STAGES[0], True), caps),
        "register_caps_stage3": (_stage_case(SWIN_B_STAGES[2], True), caps),
        "one_tile_caps_img_stage1": (_image_case(SWIN_B_IMAGE_STAGES[0], True),
                                     dict(uncapped=base, cap168=alt(base, win_maxnreg=168),
                                          cap128=alt(base, win_maxnreg=128))),
    }


def _warm_config(args):
    name, cfg_dict, c = args
    from bevt.kernels import window_attention as K

    K.set_config(K.Config(**cfg_dict))
    try:
        bench_case(c, "triton", modes=("fwd",))
        qkv, table, kv_pad, do = make_inputs(c, torch.bfloat16)
        run_tokens(c, qkv, table, kv_pad, do, "triton")
        torch.cuda.synchronize()
        return name, "ok"
    except Exception as e:  # a config that fails to compile is reported, not fatal
        return name, repr(e)[:300]


# ----------------------------------------------------------------------------- offline compile (no GPU)
_PTR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # in the input dtype; other pointers are fp32


def offline_compile(spec, dtype_name: str, arch: int = 90) -> dict:
    """Compile one LaunchSpec for sm_<arch> without a GPU; registers / spills from ptxas -v."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec.kernel
    tname = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name]
    plane = "fp32" if dtype_name == "float32" else "fp16"  # the bias planes (_plane_dtype)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in spec.constexprs:
            sig[a] = "constexpr"
        elif a[0].isupper() and a not in ("DHW", "NB", "MD"):
            elem = tname if a in _PTR_ARGS else "i32" if a in ("TOK", "WT") else plane if a == "TAB" else "fp32"
            sig[a] = "*" + elem
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher specializes for aligned tensors
        elif a in ("qk_scale", "sm_scale"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v
                                                                      for k, v in spec.constexprs.items()},
                                    attrs=attrs)
    t0 = time.time()
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg:
        options["maxnreg"] = spec.maxnreg
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    info = out.stderr
    regs = re.findall(r"Used (\d+) registers", info)
    spill = re.findall(r"(\d+) bytes spill stores", info)
    return dict(regs=int(regs[-1]) if regs else None, spill_bytes=int(spill[-1]) if spill else None,
                shared=c.metadata.shared, wgmma=c.asm["ptx"].count("wgmma.mma_async"),
                compile_s=round(time.time() - t0, 1))


def _offline_case(args):
    c, cfg_dict = args
    from bevt.kernels import window_attention as K

    cfg = K.Config(**cfg_dict)
    dtype_name = c.get("dtype", "bfloat16")
    B, (D, H, W), nh, d = c["batch"], c["grid"], c["heads"], c["d"]
    ws = c["window"]
    nwin = tuple(-(-g // w) for g, w in zip((D, H, W), ws))
    geo = K._Geo(tuple(ws), tuple(c["table"]), tuple(c["shift"]), tuple(c["mask"]), (D, H, W), nwin,
                 B * math.prod(nwin), nh, d)
    out = {}
    for name, spec in K.launch_specs(geo, not c.get("windowed"), getattr(torch, dtype_name), False, cfg).items():
        try:
            out[name] = offline_compile(spec, dtype_name)
        except Exception as e:  # reported, not fatal: the point is to find such failures before a GPU run
            out[name] = dict(error=repr(e)[:400])
    return c["name"], out


def offline_main(workers: int, with_sweep: bool):
    from bevt.kernels import window_attention as K

    jobs, seen = [], set()
    for c in correctness_cases():
        key = (c["window"], c["table"], c["heads"], c["d"], c.get("dtype"), c.get("windowed", False))
        if key not in seen:
            seen.add(key)
            jobs.append((c, dataclasses.asdict(K.GPU_CONFIG)))
    for test, (case, variants) in ab_tests().items():
        for name, cfg in list(variants.items())[1:]:  # the default's kernels are among the correctness cases'
            jobs.append((dict(case, name=f"{test}:{name}"), dataclasses.asdict(cfg)))
    if with_sweep:
        c1 = _stage_case(SWIN_B_STAGES[0], True)
        for name, cfg in sweep_configs().items():
            jobs.append((dict(c1, name=f"sweep:{name}"), dataclasses.asdict(cfg)))
    ctx = torch.multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        for name, res in ex.map(_offline_case, jobs):
            print(f"{name:<34} " + "  ".join(
                f"{k}: " + (v["error"][:120] if "error" in v else
                            f"{v['regs']} regs, {v['spill_bytes']} B spill, smem {v['shared']}, wgmma {v['wgmma']}, "
                            f"{v['compile_s']}s") for k, v in res.items()), flush=True)


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--stages", default="stage1,stage2,stage3,stage4")
    ap.add_argument("--offline-compile", action="store_true", help="compile for sm_90 on this machine (no GPU)")
    args = ap.parse_args()
    if args.offline_compile:
        return offline_main(args.workers, args.sweep)
    from bevt.kernels import window_attention as K

    out_dir = os.environ.get("OUT", ".")
    res = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    import triton

    res["triton"] = triton.__version__
    t_start = time.time()
    ctx = torch.multiprocessing.get_context("spawn")

    # 1. correctness (parallel: one worker per compile-sharing group)
    if not args.skip_check:
        groups: dict = {}
        for c in correctness_cases():
            key = (c["window"], c["table"], c["heads"], c["d"], c.get("dtype"), c.get("windowed", False))
            groups.setdefault(key, []).append(c)
        with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as ex:
            checks = [r for rs in ex.map(_worker, list(groups.values())) for r in rs]
        res["correctness"] = checks
        print(f"correctness done in {time.time() - t_start:.0f}s")
        for r in checks:
            e = r["errors"]
            parts = []
            for n in NAMES:
                if n in e:
                    x = e[n]
                    ratio = x["max"] / x["ref_max"] if x.get("ref_max") else float("nan")
                    parts.append(f"{n} {x['max']:.2e}/{x.get('ref_max', float('nan')):.2e} (x{ratio:.2f})")
            print(f"  {'OK ' if r['ok'] else 'BAD'} {r['case']:<22} first {r['first_call_s']:5.1f}s  " + "  ".join(parts))

    # 2. determinism of the backward
    c = _stage_case(SWIN_B_STAGES[2], True)
    qkv, table, kv_pad, do = make_inputs(c, torch.bfloat16)
    a = run_tokens(c, qkv, table, kv_pad, do, "triton")
    b = run_tokens(c, qkv, table, kv_pad, do, "triton")
    res["deterministic"] = all(torch.equal(x, y) for x, y in zip(a, b))
    print("backward bitwise deterministic:", res["deterministic"])

    # 3. sweep (compiles warmed in parallel, timed serially)
    if args.sweep:  # at stage 1 and stage 3 (18 of Swin-B's 24 blocks), shifted
        cases = [_stage_case(SWIN_B_STAGES[0], True), _stage_case(SWIN_B_STAGES[2], True)]
        cfgs = sweep_configs()
        with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as ex:
            jobs = [(n, dataclasses.asdict(v), c) for c in cases for n, v in cfgs.items()]
            warm = {}
            for (n, _, c), (_, status) in zip(jobs, ex.map(_warm_config, jobs)):
                warm[(n, c["name"])] = status
        res["sweep"] = {}
        for c in cases:
            res["sweep"][c["name"]] = {}
            for name, cfg in cfgs.items():
                if warm.get((name, c["name"])) != "ok":
                    res["sweep"][c["name"]][name] = dict(error=warm.get((name, c["name"])))
                    continue
                K.set_config(cfg)
                res["sweep"][c["name"]][name] = bench_case(c, "triton")
            K.set_config(None)
            print(f"sweep ({c['name']}, bf16, ms):")
            for name, t in res["sweep"][c["name"]].items():
                print(f"  {name:<18} " + ("  ".join(f"{k} {v:.3f}" for k, v in t.items()
                                                     if k in ("fwd", "bwd", "fwd_bwd", "fwd_bwd_graph"))
                                          if "error" not in t else t["error"]), flush=True)

    # 4. default choices against their alternatives (see ab_tests)
    for test, (case, variants) in ab_tests().items():
        res[test] = {}
        for name, cfg in variants.items():
            K.set_config(cfg)
            res[test][name] = bench_case(case, "triton")
        K.set_config(None)
        print(f"{test}, {case['name']} (fwd / fwd+bwd graph ms): " + "  ".join(
            f"{n} {t['fwd']:.3f} / {t['fwd_bwd_graph']:.3f}" for n, t in res[test].items()))

    # 5. profile + timings of the stages (default config)
    for s in (SWIN_B_STAGES[0], SWIN_B_STAGES[2], SWIN_B_STAGES[3]):
        c = _stage_case(s, s.name != "stage4")
        res[f"profile_{c['name']}"] = profile_kernels(c)
        print(f"kernel times, {c['name']} fwd+bwd (ms):")
        for k, v in list(res[f"profile_{c['name']}"].items())[:12]:
            print(f"  {v:7.4f}  {k}")
    rows = []
    wanted = args.stages.split(",")
    for s in SWIN_B_STAGES:
        if s.name not in wanted:
            continue
        for shifted in ((False, True) if s.name != "stage4" else (False,)):
            c = _stage_case(s, shifted)
            nwin = s.windows
            row = dict(case=c["name"], triton=bench_case(c, "triton"), ref=bench_case(c, "ref", modes=("fwd_bwd",)))
            row["tflops_fwd_bwd"] = 3.5 * attn_flops(c, nwin) / (row["triton"]["fwd_bwd_graph"] * 1e-3) / 1e12
            rows.append(row)
            torch.cuda.empty_cache()
    res["stages"] = rows
    res["total_s"] = time.time() - t_start
    with open(os.path.join(out_dir, "window_attention_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{'case':<14} {'fwd':>7} {'bwd':>7} {'fwd+bwd':>8} {'graph':>7} {'ref f+b':>8} {'x ref':>6} {'TFLOP/s':>8} "
          f"{'extraMiB':>9}")
    for r in rows:
        t = r["triton"]
        print(f"{r['case']:<14} {t['fwd']:7.3f} {t['bwd']:7.3f} {t['fwd_bwd']:8.3f} {t['fwd_bwd_graph']:7.3f} "
              f"{r['ref']['fwd_bwd']:8.3f} {r['ref']['fwd_bwd'] / t['fwd_bwd_graph']:6.1f} {r['tflops_fwd_bwd']:8.1f} "
              f"{t['extra_beyond_outputs_MiB']:9.1f}")
    print(f"total {res['total_s']:.0f}s")


if __name__ == "__main__":
    main()
