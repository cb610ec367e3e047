"""Run logging on rank 0: progress bar, ``metrics.jsonl``, TensorBoard, and the end-of-run summary."""
from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.run_dir = run_dir
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("tensorboard is not installed: TensorBoard logging is off", file=sys.stderr)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=True,
                            file=sys.stderr, mininterval=0.5)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, float], bar_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _round(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in bar_keys if k in metrics}, refresh=False)
        elif self.bar is None:
            print(f"step {step}: " + " ".join(f"{k}={_fmt(metrics[k])}" for k in bar_keys if k in metrics),
                  file=sys.stderr)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_summary(title: str, rows: list[tuple[str, object]]) -> str:
    """A two-column box, printed at the end of a run."""
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = [f"== {title} " + "=" * max(0, 60 - len(title))]
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"  {k.ljust(width)}  {v}")
    lines.append("=" * 64)
    return "\n".join(lines)
