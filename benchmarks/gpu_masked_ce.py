"""GPU development run for the Triton masked-token CE: correctness, variants, breakdown, floors, in one go.

Usage (on a CUDA machine, from the repository root, after ``pip install -e .``):
    python benchmarks/gpu_masked_ce.py [--out DIR] [--quick]

Sections (each guarded, results written to DIR/masked_ce_gpu.json as they come):
  1. the BEVT-B step shape (8 x 3136 tokens, 6272 masked, D=1024, V=8192, bf16): correctness of loss,
     accuracy and the three gradients vs an fp32 reference, next to the bf16 reference's own error;
  2. fwd+bwd time and peak extra memory: gather-first reference, official all-tokens head, Triton (default
     and variants), and forward-only times;
  3. bare GEMMs of the three products through cuBLAS, and a per-kernel breakdown of the Triton path;
  4. edge cases (empty mask, all tokens masked) and odd shapes in bf16 / fp16 / fp32 with grad_output != 1.
A short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cuda_time_ms, graph_time_ms, peak_extra_mib  # noqa: E402

RES: dict = {}
OUT = "."


def save():
    with open(os.path.join(OUT, "masked_ce_gpu.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def make_inputs(B, L, D, V, masked_per_sample=None, p=None, dtype=torch.bfloat16, bias=True, seed=0, wstd=0.05):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(B, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * wstd).requires_grad_()
    b = (torch.randn(V, device="cuda", generator=g) * 0.1).requires_grad_() if bias else None
    if masked_per_sample is not None:
        r = torch.rand(B, L, device="cuda", generator=g)
        kth = r.sort(dim=1).values[:, masked_per_sample - 1:masked_per_sample]
        mask = r <= kth
    else:
        mask = torch.rand(B, L, device="cuda", generator=g) < p
    with torch.no_grad():  # half the targets are the argmax: accuracy is not trivially 0
        am = (h.float() @ w.t()).argmax(-1)
        t = torch.where(torch.rand(B, L, device="cuda", generator=g) < 0.5, am,
                        torch.randint(0, V, (B, L), device="cuda", generator=g))
    return h, mask, w, b, t


def grads_of(fn, h, w, b, gscale=1.0):
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    loss, acc = fn()
    (loss * gscale).backward() if gscale != 1.0 else loss.backward()
    out = (loss.detach().float(), acc.float(), h.grad, w.grad, None if b is None else b.grad)
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    return out


def check_case(name, inp, gscale=1.0, chunk_rows=0):
    from bevt.kernels import masked_ce as kern
    from bevt.ops.masked_ce import masked_ce_ref

    h, mask, w, b, t = inp
    tri = grads_of(lambda: kern.masked_ce(h, mask, w, b, t, chunk_rows=chunk_rows), h, w, b, gscale)
    lo = grads_of(lambda: masked_ce_ref(h, mask, w, b, t), h, w, b, gscale)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    ref = grads_of(lambda: masked_ce_ref(hd, mask, wd, bd, t), hd, wd, bd, gscale)
    row = {"case": name, "dtype": str(h.dtype), "shape": list(h.shape), "V": w.shape[0], "M": int(mask.sum()),
           "g": gscale}
    names = ["loss", "acc", "dh", "dw", "db"]
    ok = True
    for i, nm in enumerate(names):
        if ref[i] is None:
            continue
        et, el = rel(tri[i], ref[i]), rel(lo[i], ref[i])
        row[nm + "_err"], row[nm + "_ref_dtype_err"] = et, el
        if nm == "acc":
            tol = 3.0 / max(1, row["M"]) + el
        else:
            tol = max((2.0 if nm == "loss" else 3.0) * el, {torch.float32: 1e-5, torch.float16: 2e-3,
                                                           torch.bfloat16: 1e-2}[h.dtype])
        good = (et <= tol) and bool(torch.isfinite(tri[i]).all())
        ok &= good
        if not good:
            row[nm + "_FAIL"] = f"err {et:.3g} > tol {tol:.3g}"
    row["ok"] = ok
    return row


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    from bevt.kernels import masked_ce as kern
    from bevt.ops.masked_ce import masked_ce_ref
    RES["meta"] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(RES["meta"], flush=True)
    B, L, D, V, MPS = 8, 3136, 1024, 8192, 784
    M = B * MPS
    gemm_flop = 2 * M * D * V

    # ------------------------------------------------------------------ 1. correctness at the step shape
    t0 = time.time()
    inp = make_inputs(B, L, D, V, masked_per_sample=MPS)
    try:
        row = check_case("step_shape", inp)
        RES["check_step"] = row
        print("check step shape", row, f"({time.time() - t0:.1f}s incl. compile)", flush=True)
    except Exception:
        RES["check_step"] = traceback.format_exc()
        print(RES["check_step"], flush=True)
    save()

    h, mask, w, b, t = inp
    hb = h.detach()
    try:
        hd, wd = hb.float().requires_grad_(), w.detach().clone().requires_grad_()
        bd = b.detach().clone().requires_grad_()
        ref_grads = grads_of(lambda: masked_ce_ref(hd, mask, wd, bd, t), hd, wd, bd)
    except Exception:
        ref_grads = None
        print(traceback.format_exc(), flush=True)

    def zero():
        h.grad = w.grad = b.grad = None

    def run_ref():
        zero()
        loss, acc = masked_ce_ref(h, mask, w, b, t)
        loss.backward()

    def run_official():
        zero()
        logits = F.linear(h, w.to(h.dtype), b.to(h.dtype))  # head on every token (B, L, V)
        sel = logits[mask].float()
        tm = t[mask]
        loss = F.cross_entropy(sel, tm, reduction="sum") / max(1, tm.numel())
        (sel.detach().argmax(-1) == tm).float().mean()  # the accuracy the loop logs: part of the cost
        loss.backward()

    grads_mib = (h.numel() * h.element_size() + w.numel() * 4 + b.numel() * 4) / 2 ** 20
    RES["grads_mib"] = grads_mib

    # ------------------------------------------------------------------ 2. timing + memory
    # measured before and not paying (docs/kernels/masked_ce.md): use_tma False (the logits read H[idx]),
    # grad_tma, bn 128 with 4 stages, split_grad, chunk_rows 3072 (over the memory target); session 15: dS made
    # inside the gradient tiles (removed); session 16: logits statistics in the GEMM epilogue (removed),
    # persistent logits launches, dW tiles of 128 x 128. The last measured variants:
    variants = [("triton", {}), ("triton_rows2", {"ce_rows": 2}), ("triton_dh_64x256", {"hbm": 64})]
    if args.quick:
        variants = variants[:2]
    providers = [("ref_gather_first", run_ref), ("official_all_tokens", run_official)]
    for name, cfg in variants:
        cfg = dict(cfg)
        chunk = cfg.pop("chunk_rows", 0)

        def f(cfg=cfg, chunk=chunk):
            zero()
            with kern.config_override(**cfg):
                loss, acc = kern.masked_ce(h, mask, w, b, t, chunk_rows=chunk)
            loss.backward()
        providers.append((name, f))
    RES["timing"] = {}
    for name, fn in providers:
        try:
            t1 = time.time()
            fn()
            torch.cuda.synchronize()
            comp = time.time() - t1
            ms = cuda_time_ms(fn)
            cpu = []
            for _ in range(10):  # host time of one call (launches only): is the path launch-bound?
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                fn()
                cpu.append((time.perf_counter() - t2) * 1e3)
            torch.cuda.synchronize()
            zero()  # the baseline holds no gradients: the peak then includes the new ones
            mib = peak_extra_mib(fn)
            gms = graph_time_ms(fn) if name.startswith("triton") else None
            errs = None
            if name.startswith("triton") and ref_grads is not None:
                got = grads_of(lambda: kern.masked_ce(h, mask, w, b, t), h, w, b) if name == "triton" else None
                if name != "triton":
                    cfg_v = dict(dict(variants)[name])
                    ch = cfg_v.pop("chunk_rows", 0)
                    with kern.config_override(**cfg_v):
                        got = grads_of(lambda: kern.masked_ce(h, mask, w, b, t, chunk_rows=ch), h, w, b)
                errs = {k: rel(x, r) for k, x, r in zip(("loss", "acc", "dh", "dw", "db"), got, ref_grads)}
            RES["timing"][name] = {"ms": ms, "graph_ms": gms, "errs": errs, "host_ms": sorted(cpu)[5], "peak_mib": mib,
                                   "extra_mib_minus_grads": mib - grads_mib,
                                   "first_call_s": comp, "tflops_3gemm": 3 * gemm_flop / ms / 1e9}
            print(f"{name:24s} event {ms:7.3f} ms  graph {gms if gms is None else round(gms, 4)} ms  host "
                  f"{sorted(cpu)[5]:6.3f} ms  peak {mib:7.1f} MiB (-grads {mib - grads_mib:6.1f})  first {comp:.1f}s "
                  f"errs {None if errs is None else {k: float('%.2g' % v) for k, v in errs.items()}}", flush=True)
        except Exception:
            RES["timing"][name] = traceback.format_exc()[-2000:]
            print(name, RES["timing"][name], flush=True)
        save()

    # forward only (no grad needed)
    RES["fwd_only"] = {}
    for name, fn in (("ref", lambda: masked_ce_ref(h, mask, w, b, t)), ("triton", lambda: kern.masked_ce(h, mask, w, b, t))):
        try:
            with torch.no_grad():
                fn()
                RES["fwd_only"][name] = cuda_time_ms(fn)
            if name == "triton":
                def fwd_step():
                    with torch.no_grad():
                        kern.masked_ce(h, mask, w, b, t)
                RES["fwd_only"]["triton_graph"] = graph_time_ms(fwd_step)
            print(f"fwd only {name}: {RES['fwd_only'][name]:.3f} ms (graph: {RES['fwd_only'].get('triton_graph')})",
                  flush=True)
        except Exception:
            RES["fwd_only"][name] = traceback.format_exc()[-2000:]
            print(RES["fwd_only"][name], flush=True)
    save()

    # ------------------------------------------------------------------ 3. floors: bare cuBLAS GEMMs, breakdown
    try:
        hg = hb[mask].contiguous()
        wb = w.detach().to(torch.bfloat16)
        G = torch.randn(M, V, device="cuda", dtype=torch.bfloat16)
        gem = {
            "fwd_logits (M x V, K=D)": lambda: F.linear(hg, wb),
            "dH (M x D, K=V)": lambda: G @ wb,
            "dW (V x D, K=M)": lambda: G.t() @ hg,
            "W cast fp32->bf16": lambda: w.detach().to(torch.bfloat16),
            "dh zero (N x D bf16)": lambda: torch.zeros_like(hb),
        }
        RES["cublas"] = {}
        for k, fn in gem.items():
            ms = cuda_time_ms(fn, 5, 50)
            RES["cublas"][k] = {"ms": ms, "tflops": gemm_flop / ms / 1e9 if "K=" in k else None}
            print(f"cuBLAS {k:28s} {ms:.4f} ms", flush=True)
        RES["cublas_3gemm_ms"] = sum(v["ms"] for k, v in RES["cublas"].items() if "K=" in k)
        # the same products at the op's chunk size: the logits of all M rows do not fit the 64 MB budget, so
        # any design that keeps them (three GEMMs) runs them per chunk of C rows
        c_max = kern.chunk_bound(B * L, V, 2, 128)
        n_act = -(-M // c_max)
        c_rows = -(-(-(-M // n_act)) // 128) * 128
        hcc, Gc = hg[:c_rows].contiguous(), G[:c_rows].contiguous()
        chunk_gem = {
            "fwd_logits (C x V, K=D)": lambda: F.linear(hcc, wb),
            "dH (C x D, K=V)": lambda: Gc @ wb,
            "dW (V x D, K=C)": lambda: Gc.t() @ hcc,
            "full M, fwd_logits (M x V, K=D)": lambda: F.linear(hg, wb),
            "full M, dH (M x D, K=V)": lambda: G @ wb,
            "full M, dW (V x D, K=M)": lambda: G.t() @ hg,
        }
        RES["cublas_chunk"] = {"chunk_rows": c_rows, "chunks": n_act}
        for k, fn in chunk_gem.items():
            ms = graph_time_ms(fn)  # tens of us each: timed from a graph replay, without launch gaps
            rows = M if k.startswith("full") else c_rows
            RES["cublas_chunk"][k] = {"ms": ms, "tflops": 2 * rows * D * V / ms / 1e9}
            print(f"cuBLAS, graph replay, {rows} rows: {k:34s} {ms:.4f} ms", flush=True)
        RES["cublas_chunk"]["3gemm_all_chunks_ms"] = n_act * sum(
            v["ms"] for k, v in RES["cublas_chunk"].items() if isinstance(v, dict) and not k.startswith("full"))
        print(f"cuBLAS, three products over {n_act} chunks: {RES['cublas_chunk']['3gemm_all_chunks_ms']:.3f} ms", flush=True)
        hcc = Gc = None  # free (the lambdas above keep the names)
        # probe: torch._grouped_mm takes the group sizes on the device (no host sync): cuBLAS-class GEMMs for
        # a future path? one group of M rows inside a buffer of N rows
        try:
            offs = torch.tensor([M], device="cuda", dtype=torch.int32)
            hpad = torch.zeros(B * L, D, device="cuda", dtype=torch.bfloat16)
            hpad[:M] = hg
            Gp = torch.zeros(B * L, V, device="cuda", dtype=torch.bfloat16)
            Gp[:M] = G
            probes = {
                "gmm fwd (2d x 3d, offs M)": lambda: torch._grouped_mm(hpad, wb.t().unsqueeze(0), offs=offs),
                "gmm dH (2d x 3d, offs M)": lambda: torch._grouped_mm(Gp, wb.unsqueeze(0).transpose(1, 2).contiguous().transpose(1, 2), offs=offs),
                "gmm dW (2d x 2d, offs K)": lambda: torch._grouped_mm(Gp.t(), hpad, offs=offs),
            }
            RES["grouped_mm"] = {}
            for k, fn in probes.items():
                try:
                    out = fn()
                    ms = cuda_time_ms(fn, 3, 20)
                    RES["grouped_mm"][k] = {"ms": ms, "out": list(out.shape)}
                    print(f"probe {k:28s} {ms:.4f} ms  out {tuple(out.shape)}", flush=True)
                except Exception as e:
                    RES["grouped_mm"][k] = repr(e)[:300]
                    print(f"probe {k}: {repr(e)[:300]}", flush=True)
            hpad = Gp = None
        except Exception:
            print(traceback.format_exc()[-1000:], flush=True)
        G = None
    except Exception:
        RES["cublas"] = traceback.format_exc()[-2000:]
        print(RES["cublas"], flush=True)
    save()
    from torch.profiler import ProfilerActivity, profile

    RES["breakdown_ms_per_iter"], RES["breakdown_total_ms"] = {}, {}
    for name, fn in providers[2:3]:  # the default
        try:
            fn()
            torch.cuda.synchronize()
            n_it = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n_it):
                    fn()
                torch.cuda.synchronize()
            agg = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    a = agg.setdefault(ev.name[:60], [0, 0.0])
                    a[0] += 1
                    a[1] += ev.time_range.elapsed_us() / 1e3
            rows = sorted(((k, c / n_it, ms / n_it) for k, (c, ms) in agg.items()), key=lambda r: -r[2])
            RES["breakdown_ms_per_iter"][name] = rows
            print(f"kernel breakdown, {name} (per fwd+bwd):", flush=True)
            for k, c, ms in rows[:20]:
                print(f"   {ms:8.4f} ms  x{c:4.1f}  {k}", flush=True)
            RES["breakdown_total_ms"][name] = sum(r[2] for r in rows)
        except Exception:
            RES["breakdown_ms_per_iter"][name] = traceback.format_exc()[-2000:]
            print(RES["breakdown_ms_per_iter"][name], flush=True)
    save()

    # ------------------------------------------------------------------ 4. edge cases and odd shapes
    cases = []
    try:
        z = torch.zeros_like(mask)
        cases.append(("empty_mask", (h, z, w, b, t), 1.0, 0))
        cases.append(("all_masked", (h, torch.ones_like(mask), w, b, t), 1.0, 0))
        cases.append(("bf16_D96_V1000_chunks", make_inputs(3, 333, 96, 1000, p=0.3, seed=1), 2.5, 128))
        cases.append(("fp16_D384_V512_nobias_g1024", make_inputs(2, 500, 384, 512, p=0.4, dtype=torch.float16,
                                                                  bias=False, seed=2), 1024.0, 0))
        cases.append(("fp32_D32_V8191", make_inputs(2, 200, 32, 8191, p=0.5, dtype=torch.float32, seed=3), 1.0, 0))
        cases.append(("bf16_D64_V16384_multiblock", make_inputs(1, 300, 64, 16384, p=0.5, seed=4), 1.0, 0))
    except Exception:
        print(traceback.format_exc(), flush=True)
    RES["checks"] = []
    for name, cinp, g, chunk in cases:
        try:
            t1 = time.time()
            row = check_case(name, cinp, g, chunk)
            row["s"] = time.time() - t1
        except Exception:
            row = {"case": name, "error": traceback.format_exc()[-2000:]}
        RES["checks"].append(row)
        print("check", row, flush=True)
        save()

    # ------------------------------------------------------------------ summary table
    print("\n==== masked CE, BEVT-B step shape (M=6272, D=1024, V=8192, bf16), fwd+bwd ====")
    print(f"{'provider':24s} {'event ms':>9s} {'graph ms':>9s} {'host ms':>8s} {'peak MiB':>9s} {'-grads':>8s}")
    for name, r in RES["timing"].items():
        if isinstance(r, dict):
            gm = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}"
            print(f"{name:24s} {r['ms']:9.3f} {gm:>9s} {r['host_ms']:8.3f} {r['peak_mib']:9.1f} "
                  f"{r['extra_mib_minus_grads']:8.1f}")
        else:
            print(f"{name:28s} FAILED")
    if isinstance(RES.get("cublas"), dict):
        print(f"cuBLAS three bare GEMMs: {RES['cublas_3gemm_ms']:.3f} ms; floor at 778 TFLOP/s: "
              f"{3 * gemm_flop / 778e12 * 1e3:.3f} ms")
    print("checks:", [(r.get("case"), r.get("ok", "ERR")) for r in RES["checks"]],
          "step:", RES["check_step"].get("ok") if isinstance(RES["check_step"], dict) else "ERR")
    save()


if __name__ == "__main__":
    main()
