"""The shared training loop's own bookkeeping: the data-wait share it logs (and a fast loader's absence of it)."""
import json
import math
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


# ----------------------------------------------------------------------------- divergence
def _diverging_fit(tmp_path, nan_from: int, nan_to: int, *, through_params: bool, log_every: int, ckpt_every: int,
                   steps: int = 8):
    """Steps nan_from <= step < nan_to add NaN to the loss: through the parameters (their gradients and then
    the parameters turn NaN) or as a constant (the loss is NaN, the gradients stay finite)."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def compute(batches, ctx):
        b = batches["main"]
        loss = torch.nn.functional.mse_loss(model(b["x"]), b["y"])
        if nan_from <= ctx.step < nan_to:
            loss = loss + (model.weight.sum() * float("nan") if through_params else float("nan"))
        return loss, {"loss": loss}, {"clips": 4}

    cfg = LoopConfig(total_steps=steps, steps_per_epoch=steps, log_every=log_every, ckpt_every=ckpt_every,
                     progress=False, tensorboard=False)
    trainer = Trainer(model=model, compute=compute, loaders={"main": _Loader(steps, 0.0)}, main_loader="main",
                      optimizer=opt, schedule=CosineSchedule(opt, base_lr=0.01, total_steps=steps, warmup_steps=0),
                      cfg=cfg, device=torch.device("cpu"), dist=DistInfo(), run_dir=str(tmp_path), config_dict={})
    return trainer


def _checkpoint_steps(run_dir):
    from bevt.train.checkpoint import checkpoint_dirs

    return [step for step, _ in checkpoint_dirs(str(run_dir))]


def test_diverged_parameters_stop_the_run_at_the_log_step(tmp_path):
    from bevt.train.loop import TrainingDiverged

    trainer = _diverging_fit(tmp_path, 3, 99, through_params=True, log_every=1, ckpt_every=2)
    with pytest.raises(TrainingDiverged, match=r"by step 4 \(loss=nan\): the model's parameters are no longer finite"
                                               r".*last checkpoint is .*step"):
        trainer.fit()
    assert _checkpoint_steps(tmp_path) == [2]  # nothing after the bad step
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["step"] == 4  # the bad row is logged before the stop


def test_no_checkpoint_is_written_from_non_finite_parameters(tmp_path):
    """Between log steps the checkpoint itself checks: the last good checkpoint stays the latest."""
    from bevt.train.loop import TrainingDiverged

    trainer = _diverging_fit(tmp_path, 3, 99, through_params=True, log_every=100, ckpt_every=2)
    with pytest.raises(TrainingDiverged, match="refusing to write the checkpoint of step 4"):
        trainer.fit()
    assert _checkpoint_steps(tmp_path) == [2]


def test_a_lasting_non_finite_loss_stops_the_run_even_with_finite_parameters(tmp_path):
    from bevt.train.loop import NONFINITE_LOSS_PATIENCE, TrainingDiverged

    trainer = _diverging_fit(tmp_path, 2, 99, through_params=False, log_every=1, ckpt_every=0)
    with pytest.raises(TrainingDiverged, match=f"non-finite for {NONFINITE_LOSS_PATIENCE} log intervals"):
        trainer.fit()
    assert trainer.state.step == 2 + NONFINITE_LOSS_PATIENCE


def test_one_non_finite_interval_with_finite_parameters_is_survived(tmp_path):
    """fp16's loss scaler skips an overflowing step: a single bad interval is not a divergence."""
    trainer = _diverging_fit(tmp_path, 3, 4, through_params=False, log_every=1, ckpt_every=0)
    summary = trainer.fit()
    assert summary["steps"] == 8 and math.isfinite(summary["last"]["loss"])
    assert _checkpoint_steps(tmp_path) == [8]


def test_cli_reports_a_diverged_run_with_exit_code_1(capsys):
    from types import SimpleNamespace

    from bevt.recipes import RECIPES
    from bevt.train.loop import TrainingDiverged
    from bevt.train.job import run_job

    def job(cfg, resume):
        raise TrainingDiverged("training diverged by step 7 (loss=nan): ...")

    args = SimpleNamespace(recipe="default", config=None, overrides=[], print_config=False, resume=None,
                           list_recipes=False)
    assert run_job("bevt pretrain", RECIPES, job, args) == 1
    assert "bevt pretrain: training diverged by step 7" in capsys.readouterr().err


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node=2 on a machine with one GPU: the second process says so (not CUDA's raw
    'invalid device ordinal'), before touching CUDA."""
    from bevt.config import ConfigError
    from bevt.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match=r"local rank 1 .* 1 CUDA GPU\(s\) are visible.*--nproc_per_node.*run.device=cpu"):
        distributed.init_distributed("cuda")


def _broadcast_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    from bevt.train.distributed import DistInfo, broadcast_from_rank0

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # as training seeds each process: run.seed + rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[1].running_mean.fill_(rank + 1.0)
    broadcast_from_rank0(model, DistInfo(rank=rank, world_size=2))
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    tdist.destroy_process_group()


def test_broadcast_from_rank0_gives_every_process_rank0s_weights(tmp_path):
    """What the EMA of fine-tuning and AllReduceParallel start from under torchrun: rank 0's parameters and
    buffers, not each process's own seeded initialization."""
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k])
    assert r0["1.running_mean"].eq(1.0).all()


def test_a_run_refused_after_taking_its_folder_leaves_no_folder_behind(tmp_path):
    """The run folder's lock creates the folder (and its missing parents); a run that fails before writing
    anything (a bad init checkpoint, a too-small dataset) removes what the lock created, and only that."""
    from bevt.train.checkpoint import RunFolderLock

    lock = RunFolderLock(str(tmp_path / "runs" / "a" / "b"))
    lock.acquire(DistInfo())
    assert (tmp_path / "runs" / "a" / "b" / RunFolderLock.NAME).exists()
    lock.release()
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()  # a folder that was there before is kept, as is one the run wrote into
    for run in (tmp_path / "kept", tmp_path / "written"):
        lock = RunFolderLock(str(run))
        lock.acquire(DistInfo())
        if run.name == "written":
            (run / "config.json").write_text("{}")
        lock.release()
        assert run.is_dir() and not (run / RunFolderLock.NAME).exists()


def test_a_pth_that_holds_other_objects_is_refused_without_running_them(tmp_path):
    """A .pth is read with weights_only: a pickled object (here one that would create a file when
    unpickled) is never run, and the message names what the file holds."""
    from bevt.train.checkpoint import read_model_weights

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"epoch": 3}}, tmp_path / "plain.pth")
    assert set(read_model_weights(str(tmp_path / "plain.pth"))) == {"state_dict", "meta"}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil.pth cannot be read as a weights-only torch checkpoint .*it holds "
                                         r"\w+.mkdir.*without running pickled code"):
        read_model_weights(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()
