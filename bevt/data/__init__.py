"""Data: synthetic dataset, decoding, clip sampling, augmentation, datasets and loaders (docs/data.md).

Modules: ``synth`` (generator + ``bevt data synth``), ``video_io`` (PyAV / PIL decoding), ``sampling``
(mmaction ``SampleFrames``), ``transforms`` (official augmentation on uint8 frames, ``normalize``),
``datasets`` (``VideoClipDataset``, ``ImageDataset``), ``loader`` (``Loader`` interface, ``TorchLoader``,
``build_loader``, ``cycle``).

Names are imported lazily, so ``bevt data synth`` starts without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "synth": ("SynthDataset", "generate", "CLASSES", "IMAGE_CLASSES"),
    "video_io": ("VideoInfo", "VideoReader", "VideoReadError", "ImageReadError", "MediaReadError", "probe",
                 "read_frames", "read_image"),
    "sampling": ("train_clip_indices", "test_clip_indices", "uniform_segment_indices"),
    "transforms": ("ClipAugParams", "FinetuneAugParams", "ColorJitter", "sample_params", "apply_params",
                   "normalize", "IMAGENET_MEAN", "IMAGENET_STD"),
    "datasets": ("Sample", "AnnotationError", "SkippedFileWarning", "BrokenDatasetError", "read_annotation_list",
                 "scan_folder", "read_class_names", "VideoClipDataset", "ImageDataset"),
    "loader": ("Loader", "TorchLoader", "build_loader", "cycle", "collate"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bevt.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bevt.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
