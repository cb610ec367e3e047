"""Evaluation: multi-view top-1/top-5 and confusion summaries (``evaluate``), the paper's temporal-dependency
analysis (``analyze``) and the small-scale BEVT / BEVT-I / BEVT-V reproduction (``reproduce``).

Names are imported lazily, so ``import bevt.eval`` is cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": ("evaluate", "predict", "Predictions", "average_views", "topk_accuracy", "confusion_matrix",
                 "class_report", "load_classifier", "config_for", "build_eval_loader", "format_report",
                 "plot_report"),
    "analyze": ("temporal_analysis", "single_frame", "shuffle_frames", "temporal_transforms", "temporal_cells",
                "format_temporal"),
    "reproduce": ("reproduce", "reproduce_settings", "stage_names", "SCALES"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bevt.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bevt.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
