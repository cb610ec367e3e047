"""The shared training loop's own bookkeeping: the data-wait share it logs (and a fast loader's absence of it)."""
import json
import os
import time

import pytest
import torch

from bevt.train.distributed import DistInfo
from bevt.train.loop import LoopConfig, Trainer
from bevt.train.optim import CosineSchedule


class _Loader:
    """The Loader interface over fixed batches; each batch takes ``delay`` seconds to arrive."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay, self.epoch = n, delay, 0
        self.epochs_started: list[int] = []

    def __len__(self):
        return self.n

    def __iter__(self):
        self.epochs_started.append(self.epoch)
        for i in range(self.n):
            time.sleep(self.delay)
            yield {"x": torch.full((4, 3), float(i)), "y": torch.ones(4, 1)}
        self.epoch += 1  # as every Loader: a finished iteration moves on to the next epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch}


def _fit(tmp_path, delay: float, compute_s: float) -> tuple[dict, list[dict]]:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def compute(batches, ctx):
        time.sleep(compute_s)  # the step's own work
        b = batches["main"]
        loss = torch.nn.functional.mse_loss(model(b["x"]), b["y"])
        return loss, {"loss": loss}, {"clips": 4}

    steps = 6
    cfg = LoopConfig(total_steps=steps, steps_per_epoch=steps, log_every=3, progress=False, tensorboard=False)
    trainer = Trainer(model=model, compute=compute, loaders={"main": _Loader(steps, delay)}, main_loader="main",
                      optimizer=opt, schedule=CosineSchedule(opt, base_lr=0.01, total_steps=steps, warmup_steps=0),
                      cfg=cfg, device=torch.device("cpu"), dist=DistInfo(), run_dir=str(tmp_path), config_dict={})
    summary = trainer.fit()
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summary, rows


@pytest.mark.parametrize("delay, compute_s, lo, hi", [(0.06, 0.0, 60.0, 100.0), (0.0, 0.03, 0.0, 20.0)])
def test_data_wait_share_is_logged(tmp_path, delay, compute_s, lo, hi):
    summary, rows = _fit(tmp_path, delay, compute_s)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert lo <= r["data_wait_pct"] <= hi, r
    assert lo * 0.8 <= summary["data_wait_pct"] <= hi, summary


def test_secondary_loader_cycles_through_consecutive_epochs(tmp_path):
    """A shorter secondary loader (the image stream) restarts with its next epoch, none skipped: a skipped
    epoch would also make a loader that prepared the next epoch (DALI) throw that work away and rebuild."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images = _Loader(2, 0.0)

    def compute(batches, ctx):
        loss = torch.nn.functional.mse_loss(model(batches["main"]["x"]), batches["main"]["y"])
        return loss, {"loss": loss}, {"clips": 4}

    steps = 7
    cfg = LoopConfig(total_steps=steps, steps_per_epoch=steps, log_every=7, progress=False, tensorboard=False)
    Trainer(model=model, compute=compute, loaders={"main": _Loader(steps, 0.0), "images": images}, main_loader="main",
            optimizer=opt, schedule=CosineSchedule(opt, base_lr=0.01, total_steps=steps, warmup_steps=0),
            cfg=cfg, device=torch.device("cpu"), dist=DistInfo(), run_dir=str(tmp_path), config_dict={}).fit()
    assert images.epochs_started == [0, 1, 2, 3]
