"""Checkpoints: ``<run>/checkpoints/step_<N>/{model.safetensors, trainer.pt, config.json}``.

A checkpoint is written into a hidden ``.tmp-step_<N>`` folder and renamed when complete, so a crash
never leaves a half-written checkpoint where ``--resume`` would find it; the oldest complete ones beyond
``keep_last`` are removed only after the new one is in place. ``trainer.pt`` holds what exact resume
needs: optimizer, grad scaler, step/epoch, the loaders' positions and every rank's RNG states.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bevt.config import ConfigError
from bevt.train.distributed import AllReduceParallel, DistInfo, all_gather_objects

_STEP_DIR = re.compile(r"^step_(\d+)$")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (or AllReduceParallel) and/or torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, AllReduceParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer.pt")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest(run_dir: str) -> str | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def save_checkpoint(run_dir: str, step: int, *, model: torch.nn.Module, trainer_state: dict, config: dict,
                    keep_last: int) -> str:
    """Write a complete checkpoint for ``step`` (call on rank 0 only) and prune old ones."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of an interrupted save
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    os.makedirs(tmp)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "bevt", "step": str(step), "config": json.dumps(config)})
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(final):  # re-saving the same step (e.g. end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, path in checkpoint_dirs(run_dir)[:-keep_last]:
        if path != final:  # (a run's own checkpoints all precede it; never prune what was just written)
            shutil.rmtree(path, ignore_errors=True)
    return final


def check_run_folder(run_dir: str, resume: str | None) -> None:
    """Before a run does any work: ``run.out_dir`` names a folder (or nothing yet), and a fresh run (no
    --resume) does not start in a folder holding an earlier run's checkpoints: its own would interleave with
    them, ``keep_last`` would prune by step across both runs, and ``--resume auto`` would later pick either."""
    if not run_dir:
        raise ConfigError("run.out_dir is empty: name the folder the run writes to")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.out_dir={run_dir!r} is a file, not a folder")
    existing = checkpoint_dirs(run_dir)
    if not resume and existing:
        raise ConfigError(f"run.out_dir={run_dir!r} holds checkpoints of an earlier run (latest: step "
                          f"{existing[-1][0]}); continue it with --resume auto, or start this run in another folder "
                          f"(--set run.out_dir=...) or after removing {os.path.join(run_dir, 'checkpoints')}")


class RunFolderLock:
    """One job at a time per run folder: two jobs writing into one ``run.out_dir`` would interleave their
    metrics, overwrite each other's config and checkpoints, and each report the other's weights as its own.

    Rank 0 creates ``<run>/.lock`` (host and pid) atomically; a lock whose process is gone from this host is
    stale and taken over; a lock of another host cannot be checked and is refused with the way out.
    ``acquire`` raises ConfigError on every rank when the folder is taken."""

    NAME = ".lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        self.held = False
        self.made: list[str] = []  # the folders taking the lock created, deepest first

    def acquire(self, dist: DistInfo) -> None:
        problem = self._take() if dist.is_main else None
        problems = [p for p in all_gather_objects(problem, dist) if p]
        if problems:
            raise ConfigError(problems[0])

    def _take(self) -> str | None:
        folder = os.path.dirname(self.path) or "."
        self.made = []
        while folder and not os.path.exists(folder):
            self.made.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_text(self.path)
                if holder is not None and not _process_gone(holder):
                    return (f"run.out_dir={os.path.dirname(self.path)!r} is in use by another job ({holder or 'unknown'}: "
                            f"host and process id): two jobs in one folder would mix their metrics and checkpoints; "
                            f"wait for it, or use another run.out_dir (if no job runs there, delete {self.path})")
                try:
                    os.remove(self.path)  # stale: its process ended without removing it (a crash, SIGKILL)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.owner)
            self.held = True
            return None
        return f"could not take {self.path}: another job keeps creating it"

    def release(self) -> None:
        if self.held and _read_text(self.path) == self.owner:
            os.remove(self.path)
            for folder in self.made:  # a run refused before writing anything leaves no empty folder behind
                try:
                    os.rmdir(folder)
                except OSError:  # not empty: the run wrote into it
                    break
        self.held = False


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None  # released meanwhile


def _process_gone(holder: str) -> bool:
    """True when the lock's process is known to be gone: same host, no such pid. Unknown -> False."""
    host, _, pid = holder.rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """``auto`` -> latest checkpoint of the run (or None), a run folder -> its latest, else the folder given."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(run_dir)
    if os.path.isdir(os.path.join(resume, "checkpoints")):
        latest = find_latest(resume)
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: the run folder has no complete checkpoint")
        return latest
    if not os.path.isfile(os.path.join(resume, "trainer.pt")):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer.pt) nor a run folder")
    return resume


def resolve_checkpoint(path: str) -> str:
    """A checkpoint path a user gave -> the file or checkpoint folder to read (run folder -> its latest)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: the run folder has no complete checkpoint")
        return latest
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no model.safetensors) nor a run folder "
                                    f"(no checkpoints/)")
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a bevt run or checkpoint folder, a "
                                f".safetensors file or a .pth/.pt checkpoint)")
    return path


# the key of a checkpoint's config that records the files the run depends on, beside its settings
FINGERPRINTS = "fingerprints"


def checkpoint_config(path: str) -> dict | None:
    """The config saved with a bevt checkpoint (folder or its model.safetensors), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            return json.load(f)
    return None


def readable_checkpoint_config(path: str) -> dict | None:
    """:func:`checkpoint_config`, or None when its config.json cannot be read either (for checks that the
    weights' loading reports better)."""
    try:
        return checkpoint_config(path)
    except (OSError, ValueError):
        return None


def load_trainer_state(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "trainer.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path} cannot be read ({_reason(e)}): the checkpoint is truncated or corrupt; resume from "
                         f"an earlier one (the run's checkpoints/step_* folders)") from e


def _reason(e: Exception) -> str:
    """The exception's type and the first line of its message (torch.load's messages run to a page)."""
    if "Weights only load failed" in str(e):  # torch's boilerplate would suggest weights_only=False
        m = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)|but got (<[^>]+>)", str(e))
        what = f": it holds {m.group(1) or m.group(2)}" if m else ""
        return f"{type(e).__name__}: not a torch file of tensors and plain data only{what}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def read_model_weights(path: str) -> dict:
    """Tensors of a model checkpoint: a bevt checkpoint folder, ``.safetensors``, or a ``.pt/.pth`` dict
    (official BEVT / Video Swin / Swin checkpoints included; loaded without executing code)."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path} cannot be read ({_reason(e)}): the file is truncated or corrupt") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path} cannot be read as a weights-only torch checkpoint ({_reason(e)}); bevt reads "
                         f"bevt checkpoint folders, .safetensors files and .pt/.pth state dicts without running "
                         f"pickled code (a file you trust can be re-saved with its tensors only)") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def load_resumed_weights(model: torch.nn.Module, ckpt_dir: str, run_config: dict) -> None:
    """Load a checkpoint's weights into the model of the run that resumes it; when they do not fit, a
    ValueError that names the settings that differ between the checkpoint's run and this one (its
    ``config.json``) and the tensors that do not fit, instead of torch's page of key names."""
    saved = readable_checkpoint_config(ckpt_dir)  # unreadable: the tensors still say what does not fit
    if saved and _job_kind(saved) != _job_kind(run_config):
        raise ValueError(f"--resume {ckpt_dir}: it is a {_job_kind(saved)} checkpoint, and this is a "
                         f"{_job_kind(run_config)} run; --resume continues the same run exactly. To start a "
                         f"{_job_kind(run_config)} run from its weights: --set model.init_from={ckpt_dir}")
    weights = read_model_weights(ckpt_dir)
    target = unwrap_model(model)
    try:
        target.load_state_dict(weights)
        return
    except RuntimeError:
        pass
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [f"{k} {tuple(weights[k].shape)} -> {tuple(v.shape)}" for k, v in own.items()
                if k in weights and weights[k].shape != v.shape]
    parts = []
    for what, names in (("differ in shape", reshaped), ("are missing from it", missing),
                        ("are not in this model", unexpected)):
        if names:
            parts.append(f"{len(names)} {what} (e.g. {', '.join(names[:3])})")
    diffs = [] if not saved else [f"{k}: {a!r} there, {b!r} here" for k, (a, b)
                                  in _config_differences(saved, run_config).items()
                                  if k.split(".")[0] in ("model", "tokenizer")]
    settings = "; its settings differ from this run's: " + "; ".join(diffs[:6]) if diffs else ""
    raise ValueError(f"--resume {ckpt_dir}: its weights do not fit this run's model: tensors "
                     f"{'; '.join(parts)}{settings}. Resume with the settings of that run (its config.json), or start "
                     f"a new run (another run.out_dir, or without --resume); model.init_from={ckpt_dir} starts one "
                     f"from its weights")


def changed_settings(ckpt_dir: str, run_config: dict, limit: int = 8) -> list[str]:
    """``"key: old there, new here"`` for the settings of this run that differ from the checkpoint's run
    (not ``run.out_dir``, nor the recorded file fingerprints); empty when its config cannot be read."""
    saved = readable_checkpoint_config(ckpt_dir)
    if not saved:
        return []
    diffs = [f"{k}: {a!r} there, {b!r} here" for k, (a, b) in _config_differences(saved, run_config).items()
             if k != "run.out_dir" and not k.startswith(FINGERPRINTS)]
    return diffs[:limit] + ([f"and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _job_kind(config: dict) -> str:
    return "pretraining" if "tokenizer" in config else "fine-tuning"


def _config_differences(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts (a key only one has counts too)."""
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(_config_differences(va, vb, name + "."))
        elif key not in a and vb == "":  # a setting added since that run was saved, left empty: no change
            continue
        elif va != vb:
            out[name] = (va, vb)
    return out
