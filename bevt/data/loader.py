"""Batch loaders: the interface every decoder implements, and the CPU one on torch's DataLoader.

Shape legend: B batch, V views, T frames, S crop size, s tokenizer-copy size, 3 channels.

**Batch contract** (dicts of tensors, pixels uint8 in 0..255, normalised on the device with
:func:`bevt.data.transforms.normalize`):

==============================  ===========================================================================
video, ``pretrain``             ``video`` (B, 3, T, S, S), ``video_tok`` (B, T, 3, s, s), ``label`` (B,),
                                ``index`` (B,)
video, ``finetune``             ``video`` (B, 3, T, S, S), ``label``, ``index``
video, ``test``                 ``video`` (B, V, 3, T, S, S), ``label``, ``index``
images, ``pretrain``            ``images`` (B, 3, S, S), ``images_tok`` (B, 3, s, s), ``label``, ``index``
images, ``finetune``/``test``   ``images`` (B, 3, S, S), ``label``, ``index``
==============================  ===========================================================================

``label`` and ``index`` are int64; ``index`` is the dataset index asked for (test mode: use it to
de-duplicate the samples that padding repeats across ranks).

**Epochs and resume.** ``epoch`` is the epoch the next iteration runs (or is running); ``position`` the
number of its batches already handed out. Iterating to the end of an epoch moves to the next one
(``epoch + 1``, position 0); stopping early (``break``) keeps the place, and the next ``iter()``
continues from it. ``state_dict()`` taken after batch k of an epoch, loaded into a new loader built the
same way, makes it continue with batch k + 1 -- the same samples, the same augmentation.

**Sharding** (DDP): the epoch's permutation comes from ``(seed, epoch)`` and is the same on every rank;
rank r takes every ``world_size``-th sample starting at r, as ``DistributedSampler``. ``drop_last=True``
drops the tail that does not divide evenly between ranks and the last incomplete batch; ``False`` pads
with repeated samples to an equal split and keeps a short last batch.
"""
from __future__ import annotations

import abc
import math
import os
import random
import signal
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from bevt.data.datasets import ImageDataset, VideoClipDataset, warn_skipped

__all__ = ["Loader", "TorchLoader", "collate", "cycle", "build_loader", "DECODERS"]

DECODERS = ("auto", "pyav", "dali")


class Loader(abc.ABC):
    """What the trainer needs from a loader, whatever decodes the data (PyAV workers or DALI on the GPU)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch, from ``position``; advances the epoch at its end."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Batches per epoch for this rank (the whole epoch, not what remains)."""

    @property
    @abc.abstractmethod
    def epoch(self) -> int:
        """The epoch the next (or current) iteration runs."""

    @property
    @abc.abstractmethod
    def position(self) -> int:
        """Batches of the current epoch already handed out."""

    @abc.abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """At least ``epoch``, ``position``, ``seed``, ``batch_size``, ``world_size``, ``num_samples``,
        ``skipped_files``; plain Python values (saved inside checkpoints)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (the next batch is the one after)."""

    @property
    @abc.abstractmethod
    def skipped_files(self) -> list[str]:
        """Sorted paths of the unreadable files skipped so far (all workers of this rank)."""

    def close(self) -> None:
        """Release workers / pipelines. The loader is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cycle(loader: Loader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``loader`` endlessly, epoch after epoch (the image loader beside the video one).

    The loader keeps counting epochs and positions, so its ``state_dict`` still resumes exactly.
    """
    if len(loader) == 0:
        raise ValueError("cannot cycle a loader with no batches per epoch (dataset smaller than one batch?)")
    while True:
        yield from loader


_SKIP_KEYS = ("skipped", "skip_reasons")  # per-sample lists of the unreadable files and why


def collate(samples: list[dict]) -> dict:
    """Stack the tensors of a list of sample dicts; concatenate their ``skipped`` / ``skip_reasons`` lists."""
    out = {}
    for key in samples[0]:
        if key in _SKIP_KEYS:
            out[key] = [p for s in samples for p in s[key]]
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def _init_worker(worker_id: int) -> None:
    # The datasets draw from per-sample generators; seeding the global RNGs (from the per-worker seed
    # that torch derives from the loader's generator) keeps any other randomness reproducible too.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    # This worker's copy of the dataset stays silent about unreadable files: the loader warns once per file
    # from the main process (each worker warning on its own repeated a file once per worker that met it).
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "warn_skips"):
        info.dataset.warn_skips = False
    # Ctrl-C and a scheduler's SIGTERM reach every process of the job. The main process answers them: the
    # training loop finishes its step and writes a checkpoint (bevt.train.loop.StopRequests), and under
    # torchrun that takes up to run.log_every more steps. A worker that died of the signal first would break
    # that ("worker exited unexpectedly"), so a worker ignores SIGINT and keeps serving for
    # WORKER_SIGTERM_GRACE_S after a SIGTERM. It ends sooner when the loader closes (torch sends it a stop
    # message); the grace also bounds the wait of a process that exits without closing its loaders
    # (multiprocessing terminates its workers with SIGTERM, then joins them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


WORKER_SIGTERM_GRACE_S = 30.0


def _worker_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one countdown
    timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, args=(128 + signal.SIGTERM,))
    timer.daemon = True
    timer.start()


class _EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys for one rank, from ``start_batch`` on (mutable between epochs)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int,
                 shuffle: bool, drop_last: bool):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch = 0
        self.start_batch = 0
        if drop_last:
            self.per_rank = num_samples // world_size
            self.num_batches = self.per_rank // batch_size
        else:
            self.per_rank = math.ceil(num_samples / world_size)
            self.num_batches = math.ceil(self.per_rank / batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch`` -> int64 (per_rank,)."""
        n, world = self.num_samples, self.world_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self.per_rank * world
        if total > n:  # pad by wrapping around (only without drop_last)
            order = np.resize(order, total)
        return order[:total][self.rank::world]

    def __iter__(self):
        shard = self.indices(self.epoch)
        b = self.batch_size
        for k in range(self.start_batch, self.num_batches):
            yield [(self.epoch, int(i)) for i in shard[k * b:(k + 1) * b]]

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)


class TorchLoader(Loader):
    """A deterministic, resumable, shardable loader over a map-style dataset keyed by ``(epoch, index)``.

    Args:
        dataset: a :class:`VideoClipDataset` / :class:`ImageDataset` (any dataset taking
            ``(epoch, index)`` keys and returning dicts of tensors plus ``skipped``).
        batch_size: samples per batch on this rank.
        num_workers: decoding processes (0: in this process).
        seed: the permutation seed (use the dataset's seed).
        rank, world_size: this process's shard.
        shuffle, drop_last: see the module docstring.
        pin_memory: page-locked batches for fast host-to-device copies (default: when CUDA is present).
        persistent_workers: keep the workers between epochs (default: when there are workers).
        prefetch_factor: batches each worker prepares ahead (torch default 2).
        multiprocessing_context: e.g. ``"spawn"``; default torch's (fork on Linux).
    """

    def __init__(self, dataset, batch_size: int, *, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                 multiprocessing_context=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.shuffle, self.drop_last, self.num_workers = shuffle, drop_last, num_workers
        self._sampler = _EpochBatchSampler(len(dataset), batch_size, self.seed, rank, world_size, shuffle, drop_last)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        kwargs = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                          multiprocessing_context=multiprocessing_context, worker_init_fn=_init_worker)
        self._dl = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._sampler, num_workers=num_workers, collate_fn=collate,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(self.seed), **kwargs)
        self._epoch = 0
        self._position = 0
        self._skipped: set[str] = set()
        self._closed = False

    # -- the Loader interface ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._sampler.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def skipped_files(self) -> list[str]:
        return sorted(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = int(epoch), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("this loader was closed")
        self._sampler.epoch, self._sampler.start_batch = self._epoch, self._position
        # Without workers the dataset warns itself (once per file): it learns the files already reported.
        if self.num_workers == 0 and hasattr(self.dataset, "_warned"):
            self.dataset._warned.update(self._skipped)
        if self._position < len(self):
            for batch in self._dl:
                skipped = batch.pop("skipped", None) or []
                reasons = batch.pop("skip_reasons", None) or [""] * len(skipped)
                for path, reason in zip(skipped, reasons):
                    if path not in self._skipped:
                        self._skipped.add(path)
                        if self.num_workers > 0:  # the workers are silent (see _init_worker)
                            warn_skipped(path, reason, stacklevel=3)
                # Counted before handing it out: a state_dict taken while the caller holds batch k
                # resumes at batch k + 1.
                self._position += 1
                yield batch
        self._epoch += 1
        self._position = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "num_samples": len(self.dataset), "shuffle": self.shuffle, "drop_last": self.drop_last,
                "skipped_files": self.skipped_files}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state``. ``strict``: refuse a state whose sample order would differ here
        (another seed, batch size, world size, dataset length, shuffle or drop_last); otherwise warn.

        The rank is not compared: every rank's position is the same, so rank 0's state serves all.
        """
        mine = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {mine[k]!r}"
                 for k in ("seed", "batch_size", "world_size", "num_samples", "shuffle", "drop_last")
                 if k in state and state[k] != mine[k]]
        if diffs:
            msg = "the loader state does not match this loader, so the resumed order would differ: " + "; ".join(diffs)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg)
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved position {position} is outside this epoch's {len(self)} batches")
        self._epoch, self._position = int(state["epoch"]), position
        self._skipped.update(state.get("skipped_files", ()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        it = getattr(self._dl, "_iterator", None)  # the persistent workers' iterator, if any
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl = None


def build_loader(kind: str, items, *, batch_size: int, mode: str = "pretrain", decoder: str = "auto",
                 num_workers: int = 2, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool | None = None, drop_last: bool | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                 **dataset_kwargs) -> Loader:
    """Build the loader for a video (``kind="video"``) or image (``"image"``) dataset.

    ``items``: an annotation list path, a class-folder root, or a list of samples. ``decoder``:

    * ``pyav``: CPU worker processes (PyAV for videos, PIL for images), :class:`TorchLoader`;
    * ``dali``: NVIDIA DALI on the current CUDA device (NVDEC, nvJPEG), batches already on the device,
      :class:`bevt.data.dali.DaliLoader`; without a GPU, DALI's CPU operators (VP9/VP8/MJPEG videos).
      ``num_workers`` sets its CPU threads and ``prefetch_factor`` the batches it prepares ahead;
    * ``auto``: ``dali`` when DALI is installed and a CUDA GPU is visible (with NVDEC for videos), for
      images and for training clips of evenly spaced frames (DALI's file-list reader: 70 clips/s with
      two pipelines, nvJPEG ~4000 images/s on an H100, without using the CPU cores: a simulated Swin-B
      step waited 3.7 % of its time on DALI videos + images vs 14 % with 16 PyAV workers, and Swin-B
      pretraining ran 1.42x faster than with 8 + 8 CPU workers, docs/dali.md); else ``pyav``, which is
      faster than DALI's per-sample decoding (SSv2 segments, test views).

    Both give the same samples with the same augmentation draws (pixels differ by decoder and
    resampling rounding). ``dataset_kwargs`` go to :class:`VideoClipDataset` / :class:`ImageDataset`
    (``clip_len``, ``interval``, ``scale``, ``crop``, ``tok_size``, ...). ``shuffle`` and ``drop_last``
    default to True for ``pretrain``/``finetune`` and False for ``test``.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    train = mode != "test"
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if decoder == "auto":
        from bevt.data.dali import dali_status

        readable = kind == "image" or (train and dataset_kwargs.get("num_segments") is None)
        decoder = "dali" if readable and dali_status(kind)[0] else "pyav"
    if decoder == "dali":
        from bevt.data.dali import require_dali

        require_dali()  # before building the dataset: the error names the install command
    cls = VideoClipDataset if kind == "video" else ImageDataset
    dataset = cls(items, mode, seed=seed, **dataset_kwargs)
    if decoder == "dali":
        from bevt.data.dali import DaliLoader

        return DaliLoader(dataset, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                          drop_last=drop_last, num_threads=max(1, num_workers),
                          prefetch=prefetch_factor if prefetch_factor is not None else 2)
    # pyav: decode in CPU worker processes (PyAV for videos, PIL for images).
    return TorchLoader(dataset, batch_size, num_workers=num_workers, seed=seed, rank=rank, world_size=world_size,
                       shuffle=shuffle, drop_last=drop_last, pin_memory=pin_memory,
                       persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
