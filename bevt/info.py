"""``bevt info``: versions, devices, and which kernel backends can run here (and why not)."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform

import torch

from bevt.ops import backend as _be


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``bevt info`` prints, as data (also used by tests and benchmark metadata)."""
    import bevt

    info = {
        "bevt": bevt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "av": _version("av"),
        "nvidia-dali": _dali_version(),
        "cpu_count": os.cpu_count(),
        "cuda_devices": [],
        "kernel_defaults": _kernel_defaults(),
        "BEVT_KERNELS": os.environ.get("BEVT_KERNELS", ""),
        # "" or why BEVT_KERNELS is invalid: reported here, while every op that needs its default refuses to run
        "BEVT_KERNELS_problem": _be.environment_setting_problem(),
        "ops": {},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                         "memory_gb": round(p.total_memory / 2 ** 30, 1)})
    for name in _be.OPS:
        mod = importlib.import_module(f"bevt.ops.{name}")  # the module, not the op function of that name
        status = mod.backend_status()
        info["ops"][name] = {be: {"available": ok, "why_not": why if not ok else "", "note": why if ok else "",
                                  "capabilities": _caps(mod.CAPABILITIES.get(be))}
                             for be, (ok, why) in status.items()}
    info["cuda_extension"] = dict(zip(("built", "why_not"), _be.cuda_extension_status()))
    info["dali"] = _dali_status()
    return info


INVALID_SETTING = "invalid BEVT_KERNELS"


def _kernel_defaults() -> dict[str, str]:
    """Each op's default backend; an op whose default would come from an invalid BEVT_KERNELS says so."""
    out = {}
    for op in _be.OPS:
        try:
            out[op] = _be.get_default_backend(op)
        except ValueError:
            out[op] = INVALID_SETTING
    return out


def _caps(c) -> dict:
    if c is None:
        return {}
    return {"devices": list(c.devices), "dtypes": [_plain(d) for d in c.dtypes],
            "min_cc": ".".join(map(str, c.min_compute_capability)) if c.min_compute_capability else None,
            **{k: _plain(v) for k, v in c.extra.items()}}


def _plain(v):
    """A capability value as JSON data (``bevt info --json``): dtypes (also as dict keys) by name, tuples as lists."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    return v


def _dali_version() -> str:
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        v = _version(dist)
        if v != "not installed":
            return f"{v} ({dist})"
    return "not installed"


def _dali_status() -> dict:
    try:
        from bevt.data import dali as dali_mod
    except ImportError:
        return {"available": False, "why_not": "bevt.data.dali is not importable"}
    status = getattr(dali_mod, "dali_status", None)
    if status is None:
        return {"available": False, "why_not": "no DALI status function"}
    ok, why = status()
    return {"available": ok, "why_not": "" if ok else why}


def format_info(info: dict) -> str:
    lines = ["bevt " + info["bevt"], ""]
    lines.append("versions")
    for k in ("python", "torch", "torch_cuda", "cudnn", "triton", "numpy", "av", "nvidia-dali"):
        lines.append(f"  {k:<12} {info[k]}")
    lines.append("")
    lines.append("devices")
    lines.append(f"  cpu          {info['cpu_count']} cores")
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            lines.append(f"  cuda:{d['index']:<7} {d['name']} (sm {d['capability']}, {d['memory_gb']} GB)")
    else:
        lines.append("  cuda         none visible")
    lines.append("")
    lines.append("kernel backends (auto picks the first available in this order)")
    if info["BEVT_KERNELS_problem"]:
        lines.append(f"  problem: {info['BEVT_KERNELS_problem']}")
        lines.append("  (ops that use this default refuse to run until BEVT_KERNELS is fixed or unset)")
    for op, backends in info["ops"].items():
        default = info["kernel_defaults"][op]
        lines.append(f"  {op}  [default: {default}]")
        for be in _be.priority(op):
            st = backends[be]
            mark = "yes" if st["available"] else "no "
            why = st["why_not"] or st["note"]
            lines.append(f"    {be:<7} {mark}  {why}".rstrip())
    lines.append("")
    ext = info["cuda_extension"]
    lines.append(f"cuda extension bevt._C: {'built' if ext['built'] else 'not available: ' + ext['why_not']}")
    dali = info["dali"]
    lines.append(f"DALI GPU decoding: {'available' if dali['available'] else 'not available: ' + dali['why_not']}")
    if info["BEVT_KERNELS"]:
        lines.append(f"BEVT_KERNELS={info['BEVT_KERNELS']}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--models", action="store_true", help="list the registered models")
    p.add_argument("--recipes", action="store_true", help="list the pretraining and fine-tuning recipes")


def run(args) -> int:
    if getattr(args, "models", False):
        from bevt.models import list_models, model_config

        for name in list_models():
            c = model_config(name)
            print(f"{name:<40} embed {c['embed_dim']:<4} depths {c['depths']} heads {c['num_heads']}")
        return 0
    if getattr(args, "recipes", False):
        from bevt.recipes import RECIPES as PRETRAIN
        from bevt.train.finetune import RECIPES as FINETUNE
        from bevt.train.job import print_recipes

        for i, (command, recipes) in enumerate((("bevt pretrain", PRETRAIN), ("bevt finetune", FINETUNE))):
            print(f"{chr(10) if i else ''}{command} --recipe NAME  ({recipes.job})")
            print_recipes(recipes)
        return 0
    info = collect()
    if getattr(args, "json", False):
        import json

        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0

