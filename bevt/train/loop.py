"""The training loop shared by pretraining and fine-tuning.

A job supplies a ``compute(batches, ctx) -> (loss, metrics, counts)`` function and its loaders; the
loop owns everything else: micro-batches and gradient accumulation, AMP, clipping, the optimizer and
schedule, DDP, logging, checkpoints and exact resume.

Host syncs: none per step except on log steps (``run.log_every``), where the accumulated device-side
metrics are reduced and read once, and at checkpoints. Everything else stays queued on the device.

Divergence fails clearly (:class:`TrainingDiverged`): a non-finite logged loss with non-finite parameters
(or a loss non-finite for several log intervals) stops the run, and no checkpoint is written from
non-finite parameters, so the last good one stays the latest.

Ctrl-C or SIGTERM (a cluster's preemption) stops the run cleanly (:class:`StopRequests`): the step finishes,
a checkpoint is written, and ``--resume auto`` continues exactly from it. One process stops after the step
it is in; several stop together at the next log step, where the request rides in the metrics' all-reduce.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from bevt.train import checkpoint as ckpt
from bevt.train.distributed import AllReduceParallel, DistInfo, all_gather_objects, all_reduce_mean, barrier
from bevt.train.logger import RunLogger
from bevt.train.optim import CosineSchedule


@dataclass
class StepContext:
    """Where the loop is when it calls the job's ``compute``."""

    step: int  # optimizer step, 0-based
    micro: int  # micro-batch within the step
    accum_steps: int
    epoch: int
    device: torch.device
    dist: DistInfo
    seed: int

    @property
    def micro_step(self) -> int:
        """Global micro-batch counter: the key of this micro-batch's random masks."""
        return self.step * self.accum_steps + self.micro


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # run.amp -> autocast dtype ("off": none)
# log intervals in a row whose loss may be non-finite while the parameters stay finite (fp16: the loss
# scaler skips the steps whose gradients overflowed; a rare overflowing forward is survivable, a lasting one
# means every step is being skipped)
NONFINITE_LOSS_PATIENCE = 3


class TrainingDiverged(RuntimeError):
    """The loss or the parameters stopped being finite; nothing is written after that point."""

Compute = Callable[[dict, StepContext], "tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]"]


@dataclass
class LoopConfig:
    total_steps: int
    steps_per_epoch: int
    accum_steps: int = 1
    clip_grad: float = 0.0
    amp: str = "off"  # bf16 | fp16 | off
    log_every: int = 10
    ckpt_every: int = 0  # 0: end of each epoch
    keep_last: int = 3
    progress: bool = True
    tensorboard: bool = True
    seed: int = 0
    bar_keys: tuple[str, ...] = ("loss",)
    desc: str = "train"


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    metric_history: list = field(default_factory=list)


class StopRequests:
    """While active (``with``), SIGINT and SIGTERM ask the loop to stop after the current step instead of
    killing the process; :attr:`received` is the first one.

    A second signal, in a single process, restores the handlers that were there before and delivers itself
    again, so a second Ctrl-C stops at once (KeyboardInterrupt). Under torchrun a second signal is expected and
    ignored: the launcher forwards to its workers the signal that its process group already received, then
    kills them after its shutdown timeout (30 s by default), which is the way to stop at once there. Only the
    main thread can install signal handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if not self.dist.enabled:
                self._restore()
                signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum)
        if self.dist.enabled:
            what = (f"rank {self.dist.rank}: stopping at the next log step with the other processes and writing a "
                    f"checkpoint")
        else:
            what = "stopping after this step and writing a checkpoint (send it again to stop at once, without one)"
        print(f"\nbevt: {self.received.name} received; {what}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, *, model: nn.Module, compute: Compute, loaders: dict, main_loader: str,
                 optimizer: torch.optim.Optimizer, schedule: CosineSchedule, cfg: LoopConfig, device: torch.device,
                 dist: DistInfo, run_dir: str, config_dict: dict, ema=None,
                 on_epoch_end: Callable[[int, "Trainer"], dict | None] | None = None):
        self.model, self.compute = model, compute
        self.loaders, self.main = loaders, main_loader
        self.optimizer, self.schedule = optimizer, schedule
        self.cfg, self.device, self.dist = cfg, device, dist
        self.run_dir, self.config_dict = run_dir, config_dict
        self.ema, self.on_epoch_end = ema, on_epoch_end
        self.state = LoopState()
        self.amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self._iters: dict[str, Iterator] = {}
        self.last_checkpoint: str | None = None
        self._saved_step = -1
        self._nonfinite_intervals = 0

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {
            "step": self.state.step, "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "loaders": {k: v.state_dict() for k, v in self.loaders.items()},
            "rng": all_gather_objects(ckpt.rng_state(), self.dist),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
        }

    def resume_as_asked(self, resume: str | None) -> None:
        """``resume``: None (start fresh), a checkpoint folder, a run folder (its latest), or ``"auto"`` (this
        run's own latest, starting fresh when it has none); says on stderr what happened."""
        resume_dir = ckpt.resolve_resume(resume, self.run_dir)
        if resume_dir:
            self.resume(resume_dir)
            if self.dist.is_main:
                print(f"bevt: resumed from {resume_dir} at step {self.state.step}", file=sys.stderr)
                changed = ckpt.changed_settings(resume_dir, self.config_dict)
                if changed:  # allowed (a longer schedule, another log interval), but said: it is not that run
                    print(f"bevt: settings changed since that checkpoint (they apply from here on): "
                          f"{'; '.join(changed)}", file=sys.stderr)
        elif resume == "auto" and self.dist.is_main:
            print(f"bevt: no checkpoint in {self.run_dir}; starting from the beginning", file=sys.stderr)

    def resume(self, ckpt_dir: str) -> None:
        """Continue exactly where the checkpoint left off (model, optimizer, scaler, data, RNG)."""
        st = ckpt.load_trainer_state(ckpt_dir)
        if st.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"--resume {ckpt_dir}: it was written by {st.get('world_size')} processes, this run has "
                             f"{self.dist.world_size}: exact resume needs the same number (the data order and every "
                             f"rank's RNG state depend on it); model.init_from={ckpt_dir} starts a new run from its "
                             f"weights")
        ckpt.load_resumed_weights(self.model, ckpt_dir, self.config_dict)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        for k, v in self.loaders.items():
            if k not in st["loaders"]:
                raise ValueError(f"--resume {ckpt_dir}: it has no state for the {k!r} loader (a run of another "
                                 f"model.mode?); exact resume needs the loaders that run had")
            v.load_state_dict(st["loaders"][k])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        ckpt.set_rng_state(st["rng"][self.dist.rank])
        self.state.step, self.state.epoch, self.state.step_in_epoch = st["step"], st["epoch"], st["step_in_epoch"]
        if os.path.dirname(os.path.abspath(ckpt_dir)) == os.path.abspath(os.path.join(self.run_dir, "checkpoints")):
            # this run's own checkpoint of this step exists: a finished run resumed again writes nothing
            self.last_checkpoint, self._saved_step = ckpt_dir, self.state.step

    def _epoch_end_keeping_the_epoch(self, epoch: int) -> dict | None:
        """``on_epoch_end`` (validation); when it fails (unreadable validation videos, say), the epoch just
        trained is checkpointed first, so that ``--resume auto`` goes on from it once the cause is fixed. One
        process only: under torchrun the other processes may be waiting inside the validation."""
        try:
            return self.on_epoch_end(epoch, self)
        except Exception:
            if self.dist.enabled or self._saved_step == self.state.step:
                raise
            path = self.save()
            print(f"bevt: the end-of-epoch work after epoch {epoch} failed (below); the epoch's checkpoint is "
                  f"written: {path}; once the cause is fixed, the same command with --resume auto goes on from it",
                  file=sys.stderr)
            raise

    def save(self) -> str | None:
        if not _parameters_finite(self.model):  # never replace good checkpoints with a diverged model
            raise TrainingDiverged(self._diverged_message(
                f"refusing to write the checkpoint of step {self.state.step}: the model's parameters are not finite"))
        state = self.trainer_state()  # every rank takes part (RNG gather)
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.state.step, model=self.model, trainer_state=state,
                                        config=self.config_dict, keep_last=self.cfg.keep_last)
        barrier(self.dist)
        self.last_checkpoint, self._saved_step = path, self.state.step
        return path

    def _check_finite(self, row: dict) -> None:
        """At a log step: raise if the logged loss is non-finite and the parameters are too (bf16/fp32: one
        bad step already ruined them) or the loss stayed non-finite for NONFINITE_LOSS_PATIENCE intervals."""
        bad = {k: v for k, v in row.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)}
        if not bad:
            self._nonfinite_intervals = 0
            return
        self._nonfinite_intervals += 1
        params_ok = _parameters_finite(self.model)
        if params_ok and self._nonfinite_intervals < NONFINITE_LOSS_PATIENCE:
            return
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        why = ("the model's parameters are no longer finite" if not params_ok else
               f"the loss was non-finite for {self._nonfinite_intervals} log intervals in a row (the parameters are "
               f"still finite: the optimizer skipped those steps)")
        raise TrainingDiverged(self._diverged_message(f"training diverged by step {self.state.step} ({shown}): {why}"))

    def _diverged_message(self, what: str) -> str:
        last = self.last_checkpoint or "none yet"
        return (f"{what}. Nothing was written after it; the last checkpoint is {last}. Usual causes: a learning "
                f"rate too high for the batch size (optim.lr, optim.warmup_epochs), fp16 overflow (run.amp=bf16), "
                f"tokenizer ids outside the codebook (tokenizer.vocab_size), broken input data. The metrics up to "
                f"this step are in {os.path.join(self.run_dir, 'metrics.jsonl')}")

    # ------------------------------------------------------------------ data
    def _next(self, name: str) -> dict:
        loader = self.loaders[name]
        if name not in self._iters:
            self._iters[name] = iter(loader)
        try:
            return next(self._iters[name])
        except StopIteration:
            if name == self.main:
                raise RuntimeError(f"the {name!r} loader ran out inside an epoch: it has {len(loader)} batches, the "
                                   f"loop needs {self.cfg.steps_per_epoch * self.cfg.accum_steps}")
            # secondary loaders cycle endlessly (official runner); the finished iteration already moved the
            # loader to its next epoch, whose first batches it may have prepared (DALI)
            self._iters[name] = iter(loader)
            return next(self._iters[name])

    def _start_epoch(self, epoch: int) -> None:
        loader = self.loaders[self.main]
        if loader.epoch != epoch:
            loader.set_epoch(epoch)
        self._iters.pop(self.main, None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        log = RunLogger(self.run_dir, total_steps=cfg.total_steps, start_step=st.step, enabled=self.dist.is_main,
                        progress=cfg.progress, tensorboard=cfg.tensorboard, desc=cfg.desc)
        self.model.train()
        interval = _Interval()
        t0 = time.perf_counter()
        wait_total, peak_mem = 0.0, 0.0
        first: dict[str, float] | None = None
        last: dict[str, float] = {}
        stopped_by: str | None = None  # why the run stopped before total_steps
        self._start_epoch(st.epoch)
        try:
            with StopRequests(self.dist) as stop:
                while st.step < cfg.total_steps:
                    lr = self._optimizer_step(interval)
                    log.advance()
                    end_of_epoch = st.step_in_epoch >= cfg.steps_per_epoch
                    # one process stops right after the step a signal arrived in; several agree at a log step
                    stop_now = stop.received is not None and not self.dist.enabled
                    if st.step % cfg.log_every == 0 or st.step == cfg.total_steps or end_of_epoch or stop_now:
                        last, stop_now = self._log_interval(log, interval, lr, stop)
                        first = first or last
                        wait_total += interval.wait_s
                        peak_mem = max(peak_mem, last.get("mem_gb", 0.0))
                        interval = _Interval()
                    if end_of_epoch:
                        st.epoch += 1
                        st.step_in_epoch = 0
                        if self.on_epoch_end is not None and not stop_now:
                            extra = self._epoch_end_keeping_the_epoch(st.epoch)
                            if extra:
                                log.log(st.step, extra, tuple(extra))
                        if cfg.ckpt_every == 0 and st.step < cfg.total_steps:
                            self.save()
                        self._start_epoch(st.epoch)
                    if cfg.ckpt_every and st.step % cfg.ckpt_every == 0 and st.step < cfg.total_steps:
                        self.save()
                    if stop_now and st.step < cfg.total_steps:
                        stopped_by = (stop.received.name if stop.received is not None
                                      else "a signal to another process")
                        break
                if self._saved_step != st.step:
                    self.save()
        finally:
            log.close()
        elapsed = time.perf_counter() - t0
        return {"steps": st.step, "epochs": st.epoch, "elapsed_s": elapsed, "first": first or {}, "last": last,
                "peak_mem_gb": peak_mem, "data_wait_pct": 100.0 * wait_total / max(elapsed, 1e-9),
                "checkpoint": self.last_checkpoint, "total_steps": cfg.total_steps, "stopped_by": stopped_by}

    def _optimizer_step(self, interval: "_Interval") -> float:
        """One optimizer step: its micro-batches' forward and backward, the gradient average (AllReduceParallel;
        DDP did it during the backward), clipping, the update and the EMA. Metrics stay on the device, summed
        into ``interval``. Returns the step's learning rate."""
        cfg, st = self.cfg, self.state
        lr = self.schedule.apply(st.step)
        for micro in range(cfg.accum_steps):
            t_wait = time.perf_counter()
            batches = {name: self._next(name) for name in self.loaders}
            interval.wait_s += time.perf_counter() - t_wait
            ctx = StepContext(st.step, micro, cfg.accum_steps, st.epoch, self.device, self.dist, cfg.seed)
            sync = (contextlib.nullcontext() if micro == cfg.accum_steps - 1 or not self.dist.enabled
                    else self.model.no_sync())
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, metrics, n = self.compute(batches, ctx)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            interval.add(metrics, n)
        if isinstance(self.model, AllReduceParallel):
            self.model.sync_grads()
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            interval.add({"grad_norm": gnorm * cfg.accum_steps}, {}, micro_batches=0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, st.step)
        st.step += 1
        st.step_in_epoch += 1
        return lr

    def _log_interval(self, log: RunLogger, interval: "_Interval", lr: float,
                      stop: StopRequests) -> tuple[dict[str, float], bool]:
        """The loop's one host sync: reduce the interval's device metrics over the processes, together with
        whether any process was asked to stop; log the row and check it is finite. Returns (row, stop)."""
        st = self.state
        keys = sorted(interval.sums)
        local = torch.stack([interval.sums[k] for k in keys]) / interval.n_micro
        asked = torch.tensor([float(stop.received is not None)], device=local.device)
        vals = all_reduce_mean(torch.cat([local, asked]), self.dist).tolist()
        stop_now = vals.pop() > 0
        dt = max(time.perf_counter() - interval.t0, 1e-9)
        row = dict(zip(keys, vals))
        row.update(epoch=st.epoch, lr=lr)
        for k, v in interval.counts.items():
            row[f"{k}_per_s"] = v * self.dist.world_size / dt
        # host time blocked in next(loader): the step waited for data (the GPU work is asynchronous, so the
        # host only blocks there when the loaders are behind), as a share of the interval's time
        row["data_wait_pct"] = 100.0 * interval.wait_s / dt
        if self.device.type == "cuda":
            row["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        log.log(st.step, row, self.cfg.bar_keys)
        self._check_finite(row)
        return row, stop_now


@dataclass
class _Interval:
    """What the loop accumulates between two log steps: metric sums (device tensors, read only at the log
    step), sample counts, micro-batches, and the host time spent waiting for data."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    n_micro: int = 0
    wait_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, torch.Tensor], counts: dict[str, int], micro_batches: int = 1) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.n_micro += micro_batches


def _parameters_finite(model: nn.Module) -> bool:
    """One host sync: are all parameters finite?"""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def steps_for(epochs: float, steps_per_epoch: int, max_steps: int = 0) -> int:
    total = max(1, int(math.ceil(epochs * steps_per_epoch)))
    return min(total, max_steps) if max_steps else total
