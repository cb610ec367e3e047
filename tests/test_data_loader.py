"""TorchLoader: worker-count independence, exact resume, DDP sharding, skipped files, cycling."""
from __future__ import annotations

import warnings

import pytest
import torch

from bevt.data.datasets import ImageDataset, SkippedFileWarning, VideoClipDataset, read_annotation_list
from bevt.data.loader import Loader, TorchLoader, build_loader, cycle

VIDEO_KW = dict(clip_len=4, interval=4, scale=(64, 72), crop=56, tok_size=28)
IMAGE_KW = dict(scale=(64, 72), crop=56, tok_size=28)


def _video(synth_dataset, **kw):
    return VideoClipDataset(synth_dataset.train_list, "pretrain", **{**VIDEO_KW, **kw}, seed=7)


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_worker_count_does_not_change_batches(synth_dataset):
    ds = _video(synth_dataset)
    with TorchLoader(ds, 4, num_workers=0, seed=7) as l0, TorchLoader(ds, 4, num_workers=2, seed=7) as l2:
        b0, b2 = list(l0), list(l2)
    assert len(b0) == 4
    assert b0[0]["video"].shape == (4, 3, 4, 56, 56) and b0[0]["video_tok"].shape == (4, 4, 3, 28, 28)
    assert set(b0[0]) == {"video", "video_tok", "label", "index"}  # "skipped" is taken out
    _assert_same_batches(b0, b2)


def test_epochs_permute_and_advance(synth_dataset):
    with TorchLoader(_video(synth_dataset), 4, seed=7) as loader:
        assert isinstance(loader, Loader) and len(loader) == 4 and loader.epoch == 0
        e0 = torch.cat([b["index"] for b in loader])
        assert loader.epoch == 1 and loader.position == 0
        e1 = torch.cat([b["index"] for b in loader])
        assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(16))
        assert not torch.equal(e0, e1)
        loader.set_epoch(0)
        assert torch.equal(torch.cat([b["index"] for b in loader]), e0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(synth_dataset, num_workers):
    """3 batches, state_dict, new loader, load_state_dict: the next batch is the 4th of an uninterrupted run
    (and the same holds across the epoch boundary)."""
    ds = _video(synth_dataset)
    with TorchLoader(ds, 2, num_workers=0, seed=7) as ref_loader:
        reference = list(ref_loader) + list(ref_loader)  # epochs 0 and 1, 8 batches each
    with TorchLoader(ds, 2, num_workers=num_workers, seed=7) as first:
        it = iter(first)
        for _ in range(3):
            next(it)
        state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    with TorchLoader(_video(synth_dataset), 2, num_workers=num_workers, seed=7) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed) + list(resumed)
    _assert_same_batches(rest, reference[3:])


def test_break_keeps_the_place(synth_dataset):
    with TorchLoader(_video(synth_dataset), 2, seed=7) as loader:
        full = [b["index"] for b in loader]
        loader.set_epoch(0)
        for i, _ in enumerate(loader):
            if i == 1:
                break
        assert (loader.epoch, loader.position) == (0, 2)
        rest = [b["index"] for b in loader]  # a new iteration continues with batch 3
        assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))
        assert (loader.epoch, loader.position) == (1, 0)


def test_resume_refuses_a_different_setup(synth_dataset):
    ds = _video(synth_dataset)
    state = TorchLoader(ds, 2, seed=7).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        TorchLoader(ds, 4, seed=7).load_state_dict(state)
    with pytest.warns(UserWarning, match="seed"):
        TorchLoader(ds, 2, seed=8).load_state_dict(state, strict=False)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shards_are_disjoint(synth_dataset, drop_last):
    ds = VideoClipDataset([(f"v{i}.mp4", 0) for i in range(15)])  # only the sampler is exercised
    shards = []
    for rank in range(2):
        loader = TorchLoader(ds, 3, seed=1, rank=rank, world_size=2, drop_last=drop_last)
        shard = loader._sampler.indices(epoch=4)
        batches = list(loader._sampler)
        assert len(batches) == len(loader)
        shards.append(shard.tolist())
    a, b = shards
    assert len(a) == len(b)
    if drop_last:  # 15 // 2 = 7 per rank, 2 full batches of 3
        assert len(a) == 7 and len(TorchLoader(ds, 3, rank=0, world_size=2)) == 2
        assert not set(a) & set(b)
    else:  # padded to 16: 8 per rank, 3 batches (3, 3, 2); one sample repeated, all covered
        assert len(a) == 8 and len(TorchLoader(ds, 3, rank=0, world_size=2, drop_last=False)) == 3
        assert set(a) | set(b) == set(range(15))
        assert len(set(a) & set(b)) <= 1


def test_two_ranks_read_disjoint_samples(synth_dataset):
    ds = _video(synth_dataset)
    seen = []
    for rank in range(2):
        with TorchLoader(ds, 2, seed=7, rank=rank, world_size=2) as loader:
            seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 8
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_skipped_files_reach_the_loader_from_workers(broken_videos):
    items, bad = broken_videos
    ds = VideoClipDataset(items, **VIDEO_KW, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        with TorchLoader(ds, 2, num_workers=2, seed=0, drop_last=False) as loader:
            batches = list(loader)
            state = loader.state_dict()
    assert [len(b["index"]) for b in batches] == [2, 2, 2, 1]  # sizes kept despite 4 bad files of 7
    assert loader.skipped_files == sorted(bad)
    assert state["skipped_files"] == sorted(bad)
    fresh = TorchLoader(ds, 2, seed=0, drop_last=False)
    fresh.load_state_dict(state)
    assert fresh.skipped_files == sorted(bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_unreadable_file_is_warned_once_per_run(broken_videos, num_workers):
    """Two epochs: with persistent workers, each worker used to warn about each bad file it met (in its own
    process). The workers are now silent and the loader warns from this process, once per file."""
    items, bad = broken_videos
    ds = VideoClipDataset(items, **VIDEO_KW, seed=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with TorchLoader(ds, 2, num_workers=num_workers, seed=0, drop_last=False) as loader:
            for _ in range(2):
                list(loader)
    warned = [str(w.message) for w in record if issubclass(w.category, SkippedFileWarning)]
    assert sorted(m.split("skipping unreadable file ")[1].split(": ")[0] for m in warned) == sorted(bad), warned
    assert all(m.split(": ", 1)[1] for m in warned)  # every warning gives a reason


def test_a_broken_dataset_in_worker_processes_is_one_clear_error(tmp_path):
    """Raised in a worker, the error reaches the caller as the same type with the worker's one-line message
    (torch would wrap it in the worker's traceback), so the training command prints one line and exits 2."""
    from bevt.data.datasets import BrokenDatasetError, Sample

    items = []
    for i in range(4):
        (tmp_path / f"junk{i}.mp4").write_bytes(b"not a video" * 100)
        items.append(Sample(str(tmp_path / f"junk{i}.mp4"), 0))
    ds = VideoClipDataset(items, **VIDEO_KW, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        with TorchLoader(ds, 2, num_workers=1, seed=0) as loader:
            with pytest.raises(BrokenDatasetError) as info:
                next(iter(loader))
    msg = str(info.value)
    assert msg.startswith("4 files in a row could not be read") and "junk" in msg, msg
    assert f"{items[0].path}: " in msg and msg.endswith("and 1 more); the dataset looks broken"), msg  # reasons
    assert "Traceback" not in msg and "\n" not in msg and isinstance(info.value, ValueError)


def test_cycle_runs_epochs_endlessly(synth_dataset):
    images = ImageDataset(synth_dataset.images_list, **IMAGE_KW, seed=0)
    with TorchLoader(images, 5, seed=0) as loader:  # 16 images -> 3 batches per epoch
        stream = cycle(loader)
        got = [next(stream) for _ in range(7)]
        assert loader.epoch == 2 and loader.position == 1
        assert got[0]["images"].shape == (5, 3, 56, 56) and got[0]["images_tok"].shape == (5, 3, 28, 28)
    with pytest.raises(ValueError, match="no batches"):
        next(cycle(TorchLoader(images, 32, seed=0)))


def test_build_loader(synth_dataset):
    loader = build_loader("video", synth_dataset.val_list, batch_size=4, mode="test", num_workers=0,
                          clip_len=4, interval=2, short_side=64, crop=56)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["video"].shape == (4, 1, 3, 4, 56, 56)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(8))  # test: in order, no drop
    img = build_loader("image", synth_dataset.images_list, batch_size=4, decoder="pyav", num_workers=0, **IMAGE_KW)
    assert next(iter(img))["images"].shape == (4, 3, 56, 56)
    with pytest.raises(ValueError, match="unknown decoder 'nvdec'"):
        build_loader("video", synth_dataset.val_list, batch_size=2, decoder="nvdec")
    with pytest.raises(ValueError, match="kind"):
        build_loader("audio", synth_dataset.val_list, batch_size=2)


_FORK_AFTER_DECODE = """
import sys, torch
from bevt.data.datasets import VideoClipDataset, read_annotation_list
ds = VideoClipDataset(read_annotation_list(sys.argv[1], sys.argv[2]), "pretrain", clip_len=4, interval=2,
                      scale=(64, 72), crop=64, tok_size=32)
ds[0]  # the parent decodes (and keeps its RGB converter) before the workers fork
dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
print(sum(b["video"].shape[0] for b in dl))
"""


def test_fork_workers_after_the_parent_decoded(synth_dataset):
    """Regression: a frame converter kept with a thread pool in the parent hung forked workers."""
    import os
    import subprocess
    import sys

    lst = os.path.join(synth_dataset.root, "train.txt")
    r = subprocess.run([sys.executable, "-c", _FORK_AFTER_DECODE, lst, str(synth_dataset.root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == len(read_annotation_list(lst, synth_dataset.root))
