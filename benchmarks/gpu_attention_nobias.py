"""GPU development script: what attention itself costs at the window shapes, with no bias, no mask and no
bias gradient: SDPA's flash, cuDNN and memory-efficient backends and FlexAttention without score_mod, against
bevt's Triton op (bias, shift mask and bias gradient included) in the same process. q/k/v are
(windows, heads, 392, 32) bf16; fwd and fwd+bwd, CUDA-event medians.

    python benchmarks/gpu_attention_nobias.py   # writes $OUT/nobias_attention.json (or ./)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_window_attention import _stage_case, bench_case  # noqa: E402
from shapes import SWIN_B_STAGES  # noqa: E402
from timing import cuda_time_ms  # noqa: E402

res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
try:
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
except Exception as e:
    flex = None; print("no flex", e)
for s in SWIN_B_STAGES:
    nw = s.windows; N = 392; d = 32
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(nw, s.heads, N, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(nw, s.heads, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
    row = {"stage": s.name, "windows": nw, "heads": s.heads}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                f = lambda: F.scaled_dot_product_attention(q, k, v)
                row[f"{name}_fwd"] = cuda_time_ms(lambda: f().sum() if False else f())
                row[f"{name}_fwd_bwd"] = cuda_time_ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
        except Exception as e:
            row[f"{name}_error"] = str(e)[:200]
    if flex is not None:
        try:
            row["flex_fwd"] = cuda_time_ms(lambda: flex(q, k, v))
            row["flex_fwd_bwd"] = cuda_time_ms(lambda: torch.autograd.grad(flex(q, k, v), (q, k, v), do))
        except Exception as e:
            row["flex_error"] = str(e)[:300]
    c = _stage_case(s, s.name != "stage4")
    row["bevt_triton"] = bench_case(c, "triton")
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "nobias_attention.json"), "w"), indent=1)
