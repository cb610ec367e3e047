"""How fast can Triton run the masked CE's three GEMMs, as plain GEMMs, at the op's chunk size and at full M?

The masked CE kernels (kernels/masked_ce.py) run their products per chunk of C = 2176 masked rows (the 64 MB
memory target bounds the logits chunk). This probe times plain Triton GEMMs of the same shapes and layouts
(TMA descriptors made on the device, one program per tile or persistent, with or without Triton's automatic
warp specialization, several tile shapes; the logits product also with a softmax-statistics epilogue) next
to cuBLAS, to separate what the GEMM shape costs from what the fused epilogues cost.

    python benchmarks/gpu_triton_gemm.py [--out DIR]      # GPU only; writes DIR/triton_gemm_probe.json

Measured rows: benchmarks/results/triton_gemm_probe.json; reading: docs/kernels/masked_ce.md.
"""
import argparse
import json
import os

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _mm(a_ptr, b_ptr, c_ptr, pm_ptr, ps_ptr, M, N, K, sa, sb, sc,
        A_KMAJ: tl.constexpr, B_KMAJ: tl.constexpr, STATS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        PERSIST: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr, FLAT: tl.constexpr):
    if A_KMAJ:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [sa, 1], [BM, BK])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [sa, 1], [BK, BM])
    if B_KMAJ:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [sb, 1], [BN, BK])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [sb, 1], [BK, BN])
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [sc, 1], [BM, BN])
    num_tiles = ((M + BM - 1) // BM) * ((N + BN - 1) // BN)
    WS_T: tl.constexpr = WS and PERSIST
    WS_K: tl.constexpr = WS and not PERSIST
    step = num_tiles
    if PERSIST:
        step = NUM_SMS
    for tile in tl.range(tl.program_id(0), num_tiles, step, flatten=FLAT, warp_specialize=WS_T):
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        in_group = GROUP_M * num_n
        gid = tile // in_group
        first_m = gid * GROUP_M
        gsz = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % gsz)
        pid_n = (tile % in_group) // gsz
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ok in tl.range(0, K, BK, warp_specialize=WS_K):
            if A_KMAJ:
                a = a_desc.load([om, ok])
            else:
                a = a_desc.load([ok, om]).T
            if B_KMAJ:
                b = b_desc.load([on, ok]).T
            else:
                b = b_desc.load([ok, on])
            acc = tl.dot(a, b, acc)
        cq = acc.to(c_ptr.dtype.element_ty)
        c_desc.store([om, on], cq)
        if STATS:
            x = cq.to(tl.float32)
            mx = tl.max(x, axis=1)
            s = tl.sum(tl.exp(x - mx[:, None]), axis=1)
            rows = om + tl.arange(0, BM)
            tl.store(pm_ptr + rows * num_n + pid_n, mx, mask=rows < M)
            tl.store(ps_ptr + rows * num_n + pid_n, s, mask=rows < M)


def run(a, b, c, a_kmaj, b_kmaj, cfg, stats=None):
    M, N = c.shape
    K = a.shape[1] if a_kmaj else a.shape[0]
    BM, BN, BK, W, S, persist, ws = cfg
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    grid = (min(nsm, tiles),) if persist else (tiles,)
    pm, ps = stats if stats is not None else (c, c)
    _mm[grid](a, b, c, pm, ps, M, N, K, a.stride(0), b.stride(0), c.stride(0), A_KMAJ=a_kmaj, B_KMAJ=b_kmaj,
              STATS=stats is not None, BM=BM, BN=BN, BK=BK, GROUP_M=8, PERSIST=persist, NUM_SMS=nsm, WS=ws,
              FLAT=not ws, num_warps=W, num_stages=S)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_triton_gemm.py times GPU kernels: no CUDA GPU is visible")
    dev = "cuda"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device=dev, dtype=torch.int8))
    D, V = 1024, 8192
    out = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "rows": []}
    cfgs = [  # BM, BN, BK, warps, stages, persistent, warp-specialized
        (128, 256, 64, 8, 3, False, False), (128, 256, 64, 8, 3, True, False), (128, 256, 64, 8, 4, False, False),
        (256, 128, 64, 8, 3, True, False), (128, 128, 64, 8, 4, True, False),
        (128, 128, 64, 4, 4, True, True), (128, 128, 64, 4, 5, True, True), (128, 128, 128, 4, 3, True, True),
        (128, 256, 64, 4, 3, True, True), (128, 128, 64, 4, 4, False, True),
    ]
    for Mrows in (2176, 6272):  # one chunk of the op, all masked rows
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(Mrows, D, device=dev, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(V, D, device=dev, dtype=torch.bfloat16, generator=g) * 0.03)
        ds = torch.randn(Mrows, V, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
        probs = {
            "logits": (h, w, torch.empty(Mrows, V, device=dev, dtype=torch.bfloat16), True, True, h @ w.T),
            "dH": (ds, w, torch.empty(Mrows, D, device=dev, dtype=torch.bfloat16), True, False, ds @ w),
            "dW": (ds, h, torch.empty(V, D, device=dev, dtype=torch.float32), False, False, (ds.T @ h).float()),
        }
        flops = 2 * Mrows * D * V
        for name, (a, b, c, ak, bk, ref) in probs.items():
            fn = {"logits": lambda: torch.mm(h, w.T), "dH": lambda: torch.mm(ds, w),
                  "dW": lambda: torch.mm(ds.T, h)}[name]
            ms = triton.testing.do_bench(fn, warmup=50, rep=200)
            out["rows"].append(dict(M=Mrows, gemm=name, variant="cublas", ms=ms, tflops=flops / ms / 1e9))
            print(f"M={Mrows} {name:6s} cublas {ms:.4f} ms {flops/ms/1e9:.0f} TF/s", flush=True)
            for cfg in cfgs:
                for stats in ([False, True] if name == "logits" else [False]):
                    tag = ("x".join(map(str, cfg[:3])) + f" w{cfg[3]} s{cfg[4]}" + (" persist" if cfg[5] else "")
                           + (" WS" if cfg[6] else "") + (" +stats" if stats else ""))
                    try:
                        st = None
                        if stats:
                            nt = triton.cdiv(V, cfg[1])
                            st = (torch.empty(Mrows, nt, device=dev), torch.empty(Mrows, nt, device=dev))
                        c.zero_()
                        run(a, b, c, ak, bk, cfg, st)
                        err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = triton.testing.do_bench(lambda: run(a, b, c, ak, bk, cfg, st), warmup=50, rep=200)
                        row = dict(M=Mrows, gemm=name, variant=tag, ms=ms, tflops=flops / ms / 1e9, err=err)
                        print(f"M={Mrows} {name:6s} {tag:40s} {ms:.4f} ms {row['tflops']:.0f} TF/s err {err:.1e}",
                              flush=True)
                    except Exception as e:
                        row = dict(M=Mrows, gemm=name, variant=tag, error=repr(e)[:300])
                        print(f"M={Mrows} {name:6s} {tag:40s} ERROR {repr(e)[:200]}", flush=True)
                    out["rows"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_gemm_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
