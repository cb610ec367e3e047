"""Convergence check: the same BEVT run on the fast backends and on the reference backends.

Pretrains the embedded default (nano Video Swin, synthetic data, VQ tokenizer) for ``--steps`` steps
twice from the same seed, once with every op on ``auto`` (Triton / CUDA on a GPU) and once with every op
on ``ref``, and compares the loss curves: the mean absolute difference of 20-step moving averages and
the difference of the final averages must stay under ``--tol`` (relative). Run on a GPU machine:

    python benchmarks/convergence.py --steps 200 --out results/convergence.json

``--fast-set`` adds overrides to the fast run only, e.g. ``--fast-set run.compile=true --fast-set
run.cuda_graph=true`` checks the compiled, CUDA-graph-replayed step against the eager reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def curve(run_dir: str) -> np.ndarray:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["loss"] for r in rows if "loss" in r])


def smooth(x: np.ndarray, k: int = 20) -> np.ndarray:
    k = min(k, len(x))
    return np.convolve(x, np.ones(k) / k, mode="valid")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tol", type=float, default=0.03, help="relative tolerance on the smoothed curves")
    ap.add_argument("--data", default="", help="synthetic dataset folder (generated if empty)")
    ap.add_argument("--out", default="", help="write the curves and the verdict as JSON")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for both runs")
    ap.add_argument("--fast-set", dest="fast_overrides", action="append", default=[],
                    help="extra overrides for the fast (auto) run only")
    args = ap.parse_args(argv)

    from bevt.train.pretrain import build_config, pretrain

    work = tempfile.mkdtemp(prefix="bevt_conv_")
    data = args.data or os.path.join(work, "data")
    curves, summaries = {}, {}
    for kernels in ("auto", "ref"):
        over = [f"data.root={data}", f"run.out_dir={os.path.join(work, kernels)}", f"optim.max_steps={args.steps}",
                f"optim.epochs={max(1, args.steps // 12 + 1)}", "run.log_every=1", "run.progress=false",
                "run.tensorboard=false", "model.drop_path_rate=0.0", *args.overrides]
        over += [f"kernels.{op}={kernels}" for op in ("window_attention", "masked_ce", "masking")]
        over += args.fast_overrides if kernels == "auto" else []
        s = pretrain(build_config("default", over))
        curves[kernels] = curve(os.path.join(work, kernels))
        summaries[kernels] = {"backends": s["backends"], "elapsed_s": s["elapsed_s"],
                              "overrides": args.overrides + (args.fast_overrides if kernels == "auto" else [])}
    a, b = smooth(curves["auto"]), smooth(curves["ref"])
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-6)
    verdict = {"steps": args.steps, "mean_rel_diff": float(rel.mean()), "max_rel_diff": float(rel.max()),
               "final_auto": float(a[-1]), "final_ref": float(b[-1]),
               "first_auto": float(curves["auto"][0]), "first_ref": float(curves["ref"][0]),
               "tol": args.tol, "ok": bool(rel.mean() < args.tol and rel[-1] < args.tol), "runs": summaries}
    print(json.dumps(verdict, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**verdict, "curve_auto": curves["auto"].tolist(), "curve_ref": curves["ref"].tolist()}, f)
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
