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

SDPA_BACKENDS = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                 ("efficient", SDPBackend.EFFICIENT_ATTENTION))


def stage_row(s, flex) -> dict:
    """fwd / fwd+bwd ms of each backend on plain attention at stage s, then bevt's op on the real problem."""
    n, d = 392, 32
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(s.windows, s.heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    row = {"stage": s.name, "windows": s.windows, "heads": s.heads}
    fns = {name: (lambda be=be: _sdpa(q, k, v, be)) for name, be in SDPA_BACKENDS}
    if flex is not None:
        fns["flex"] = lambda: flex(q, k, v)
    for name, fn in fns.items():
        try:
            row[f"{name}_fwd"] = cuda_time_ms(fn)
            row[f"{name}_fwd_bwd"] = cuda_time_ms(lambda: torch.autograd.grad(fn(), (q, k, v), do))
        except Exception as e:  # a backend that does not take these shapes is reported, not fatal
            row[f"{name}_error"] = str(e)[:300]
    row["bevt_triton"] = bench_case(_stage_case(s, s.name != "stage4"), "triton")
    return row


def _sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        flex = None
        print("no FlexAttention:", e)
    for s in SWIN_B_STAGES:
        res["rows"].append(stage_row(s, flex))
        print(json.dumps(res["rows"][-1]), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "nobias_attention.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
