"""Shared fixtures.

``synth_dataset``: a tiny synthetic dataset (real H.264 mp4 clips, JPEG images, mmaction lists), written
once per test session into a temporary folder. It is a :class:`bevt.data.synth.SynthDataset`:
``.root``, ``.train_list`` (16 clips), ``.val_list`` (8 clips), ``.images_list`` (16 images),
``.classes_file``, ``.classes`` (8 names); clips have 32 frames of 160x128 at 25 fps. Treat it as
read-only: copy files into ``tmp_path`` to damage or modify them.

``tiny_finetune``: ``build(out_dir, *overrides) -> FinetuneConfig``, the ``default`` fine-tuning recipe on
``synth_dataset`` shrunk to seconds (nano model, 64 px crops, 4 uniform segments, batch 4, 2 steps, from
scratch, no worker processes); ``overrides`` are dotted ``section.field=value`` strings applied last;
``build.overrides`` lists the shrinking ones (for ``--set`` on a command line).

``broken_videos``: ``(items, bad_paths)``: seven :class:`bevt.data.datasets.Sample` entries, good clips of
``synth_dataset`` at indices 0, 4, 6 (labels = index) and unreadable files at 1 (missing), 2 (empty),
3 (random bytes) and 5 (an mp4 cut in half); ``bad_paths`` lists those four paths in that order.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels are tested in Triton's CPU interpreter. The variable must be set before
# any kernel module is imported (triton.jit reads it when a kernel is defined), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(autouse=True)
def _restore_process_settings():
    """A training run sets TF32, cudnn.benchmark and its ``kernels.*`` default backends for its process
    (``setup_runtime``); tests that run one in-process must not change the tests after them (the precision
    of the fp32 kernel checks on a GPU, which backend ``None`` picks)."""
    from bevt.ops import backend

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with backend.use_backend({}):  # restores the default backends on exit
        yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


SYNTH_SETTINGS = dict(num_train=16, num_val=8, num_images=16, num_frames=32, size=(160, 128), fps=25,
                      codec="h264", seed=0, workers=1)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    from bevt.data import synth

    return synth.generate(tmp_path_factory.mktemp("synth") / "synth", **SYNTH_SETTINGS)


FINETUNE_TINY = [
    "data.crop_size=64", "data.short_side=72", "data.num_segments=4", "data.batch_size=4", "data.num_workers=0",
    "data.area_range=0.5,1.0", "data.synthesize_if_missing=false", "eval.test_short_side=64", "eval.test_clips=1",
    "eval.test_batch_size=4", "eval.val_batch_size=8", "model.init_from=", "model.init_optional=false",
    "model.drop_path_rate=0.0", "run.progress=false", "run.tensorboard=false", "run.log_every=1",
    "optim.warmup_epochs=0", "optim.epochs=1", "optim.max_steps=2",
]


@pytest.fixture(scope="session")
def tiny_finetune(synth_dataset):
    from bevt.train.finetune import build_config

    def build(out_dir, *overrides):
        return build_config("default", build.overrides + [f"run.out_dir={out_dir}", *overrides])

    build.overrides = FINETUNE_TINY + [f"data.root={synth_dataset.root}"]  # for command lines
    return build


@pytest.fixture
def broken_videos(synth_dataset, tmp_path):
    from bevt.data.datasets import Sample, read_annotation_list

    good = read_annotation_list(synth_dataset.train_list)
    data = open(good[0].path, "rb").read()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    bad = [str(tmp_path / n) for n in ("missing.mp4", "empty.mp4", "garbage.mp4", "truncated.mp4")]
    items = [good[0], Sample(bad[0], 1), Sample(bad[1], 2), Sample(bad[2], 3), good[4], Sample(bad[3], 5), good[6]]
    return items, bad


def import_triton_kernels(module: str):
    """``bevt.kernels.<module>``, or None when Triton is missing. Without a GPU it is imported with
    TRITON_INTERPRET=1 (read when triton is first imported and when the kernels are defined), so CPU
    tensors run in Triton's interpreter; the module's ``interpreter_ready()`` says whether that worked
    (it cannot when this process imported triton earlier without it)."""
    import importlib

    name = f"bevt.kernels.{module}"
    if torch.cuda.is_available():
        return importlib.import_module(name)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
