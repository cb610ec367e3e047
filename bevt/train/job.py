"""What every job shares (``bevt pretrain``, ``bevt finetune``, ``bevt eval``, ``bevt tokenizer train``).

The device, process group, AMP mode and seeds of a run; where its data lists are and whether its outputs can be
written; the checks before any work; the model wrapping (compiled blocks, data parallel); the closing summary
rows; and the command-line plumbing (arguments, recipes, exit codes). The jobs themselves live in
:mod:`bevt.train.pretrain`, :mod:`bevt.train.finetune`, :mod:`bevt.eval.evaluate` and :mod:`bevt.tokenizers.cli`.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys

import numpy as np
import torch

from bevt.config import ConfigError, Recipes
from bevt.ops import BlockMaskSpec, TubeSpec, set_default_backend
from bevt.train import checkpoint as ckpt
from bevt.train.distributed import AllReduceParallel, DistInfo, barrier, init_distributed
from bevt.train.loop import TrainingDiverged


# ----------------------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA GPU is visible")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("run.amp=fp16 needs a CUDA device (use bf16 or off on the CPU)")
    return amp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_runtime(run, kernels) -> tuple[torch.device, DistInfo, str]:
    """A run's device (this process's GPU under torchrun), process group, AMP mode, seeds and kernel
    defaults, from its ``run`` and ``kernels`` config sections -> (device, dist, amp)."""
    device = resolve_device(run.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(run.amp, device)
    seed_everything(run.seed + dist.rank)
    # "auto" in the config leaves the process default alone (BEVT_KERNELS, else auto); others set it
    set_default_backend({op: be for op, be in dataclasses.asdict(kernels).items() if be != "auto"})
    return device, dist, amp


# ----------------------------------------------------------------------------- data and outputs
def data_path(root: str, name: str) -> str:
    return name if os.path.isabs(name) or not root else os.path.join(root, name)


def list_items(root: str, list_setting: str, prefix_setting: str = ""):
    """What a dataset reads for a list setting and its prefix setting (both relative to ``root``): the list or
    class folder, or the list's samples joined to the prefix folder (:func:`bevt.data.datasets.list_source`)."""
    from bevt.data.datasets import list_source

    return list_source(data_path(root, list_setting), data_path(root, prefix_setting) if prefix_setting else "")


def ensure_lists(root: str, needed: dict[str, str], *, synthesize: bool, seed: int, dist: DistInfo) -> None:
    """Raise FileNotFoundError naming the missing lists of ``needed`` (setting -> path), or, with
    ``synthesize``, generate the built-in synthetic dataset at ``root`` (rank 0; the others wait)."""
    missing = {k: p for k, p in needed.items() if not os.path.exists(p)}
    if not missing:
        return
    what = "; ".join(f"{k} ({p})" for k, p in missing.items())
    user_data = bool(root) and os.path.isdir(root) and bool(os.listdir(root))
    if not synthesize:
        if not root:
            fix = "set data.root=DIR, or give the lists as paths"
        elif user_data:  # a folder of the user's data: the list setting is what is off, not the dataset
            fix = f"check the list setting{'s' if len(missing) > 1 else ''} (relative to data.root={root!r})"
        else:
            fix = (f"check data.root={root!r}, or create the built-in dataset with: bevt data synth --out {root} "
                   "(or add --set data.synthesize_if_missing=true)")
        raise FileNotFoundError(f"dataset not found: {what} {'does' if len(missing) == 1 else 'do'} not exist; {fix}")
    if dist.is_main:
        from bevt.data import synth

        if user_data:
            raise FileNotFoundError(f"{root} exists but has no {what}; point data.root at an empty folder to "
                                    f"generate the synthetic dataset there")
        print(f"bevt: generating the built-in synthetic dataset in {root} ...", file=sys.stderr)
        synth.generate(root, seed=seed)
    barrier(dist)


def unwritable_folder(folder: str) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None: checked before work whose
    result would otherwise be lost when it is saved."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):  # the nearest folder that exists must take the new ones
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so the folder cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write into {parent} (permission denied)"
    return None


# ----------------------------------------------------------------------------- before any work
def describe_backends(device: torch.device, strict: bool = False) -> dict[str, str]:
    """Which backend each op's setting (``kernels.*``, else ``BEVT_KERNELS``, else auto) resolves to on this
    device (for the run summary). ``strict``: a backend asked for explicitly that cannot run here raises
    ConfigError naming the setting, instead of being reported."""
    from bevt.ops import backend as be
    from bevt.ops.masked_ce import can_run_triton as ce_ok
    from bevt.ops.masking import can_run_cuda
    from bevt.ops.window_attention import can_run_triton as attn_ok, table_length

    q = torch.zeros(1, 1, 98, 32, device=device, dtype=torch.bfloat16)
    table = torch.zeros(table_length((2, 7, 7)), 1, device=device)
    h = torch.zeros(4, 32, device=device, dtype=torch.bfloat16)
    preds = {
        "window_attention": {"triton": lambda r: attn_ok(q, table, window_size=(2, 7, 7), raise_error=r),
                             "ref": lambda r: True},
        "masked_ce": {"triton": lambda r: ce_ok(h, h, raise_error=r), "ref": lambda r: True},
        "masking": {"cuda": lambda r: can_run_cuda(device, BlockMaskSpec(), TubeSpec(), raise_error=r),
                    "ref": lambda r: True},
    }
    out = {}
    for op, p in preds.items():
        try:
            out[op] = be.choose(op, None, p)
        except be.BackendUnavailable as e:
            if strict:
                raise ConfigError(f"kernels.{op}={be.get_default_backend(op)} (from the config or BEVT_KERNELS) "
                                  f"cannot run here: {e} (set kernels.{op}=auto or ref)") from None
            out[op] = f"unavailable ({e})"
    return out


def check_cuda_graph(run, device: torch.device) -> None:
    """``run.cuda_graph`` needs what a CUDA graph can replay; say which setting is in the way."""
    if not run.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"run.cuda_graph=true needs a CUDA device, this run uses {device.type} "
                          f"(set run.cuda_graph=false)")


def preflight(run, device: torch.device, dist: DistInfo, resume: str) -> ckpt.RunFolderLock:
    """What a training job checks before any data or tokenizer work: the CUDA-graph setting, the output
    folder and the --resume path (a wrong one fails at once; a fresh run never writes into an earlier run's
    checkpoints), that every kernel backend asked for explicitly can run here, and the speed hint. Last, it
    takes the run folder's lock (another job writing there fails here) -> the lock, to release at the end."""
    check_cuda_graph(run, device)
    ckpt.check_run_folder(run.out_dir, resume)
    ckpt.resolve_resume(resume, run.out_dir)
    describe_backends(device, strict=True)
    speed_hint(run, device, dist)
    lock = ckpt.RunFolderLock(run.out_dir)
    lock.acquire(dist)
    return lock


def speed_hint(run, device: torch.device, dist: DistInfo) -> str | None:
    """On CUDA with ``run.compile`` or ``run.cuda_graph`` off: the one line (printed by rank 0) that says
    what they buy. They are off by default because compiling costs minutes at the start of a run."""
    if device.type != "cuda" or (run.compile and run.cuda_graph):
        return None
    hint = ("bevt: run.compile / run.cuda_graph are off; --set run.compile=true --set run.cuda_graph=true "
            "replays each step from CUDA graphs: up to 2.5x faster per step for Swin-B when Python's kernel "
            "launches are the bottleneck (benchmarks/RESULTS.md), after a few minutes of compiling")
    if dist.is_main:
        print(hint, file=sys.stderr)
    return hint


# ----------------------------------------------------------------------------- the model
def wrap_model(model: torch.nn.Module, dist: DistInfo, device: torch.device, run) -> torch.nn.Module:
    """The module the loop trains: ``model`` with its Swin blocks compiled (``run.compile``), and, when
    there are several processes, in DDP or :class:`AllReduceParallel` (``run.data_parallel``). Blocks, not
    the whole model: see :func:`bevt.models.compile_blocks`."""
    if run.compile:
        from bevt.models import compile_blocks

        compile_blocks(model)
    if dist.enabled:
        if run.data_parallel == "allreduce" or (run.data_parallel == "auto" and run.cuda_graph):
            model = AllReduceParallel(model, dist)
        else:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------- closing summary
def summary_title(command: str, s: dict) -> str:
    if s.get("stopped_by"):
        return f"{command}: stopped by {s['stopped_by']} at step {s['steps']} of {s['total_steps']}"
    return f"{command}: done"


def closing_rows(s: dict) -> list[tuple[str, object]]:
    """The last summary rows of any training run (pretraining, fine-tuning): memory, skipped files,
    checkpoint, and how to continue a run that was stopped."""
    rows = []
    if "data_wait_pct" in s:  # host time blocked on the training loaders, as a share of the whole run
        rows.append(("waiting for data", f"{s['data_wait_pct']:.1f} % of the run"))
    if s.get("peak_mem_gb"):
        rows.append(("peak GPU memory", f"{s['peak_mem_gb']:.2f} GB"))
    sk = s.get("skipped_files", [])
    rows.append(("skipped files", f"{len(sk)}" + (": " + ", ".join(sk[:5]) + (" ..." if len(sk) > 5 else "") if sk else "")))
    rows.append(("checkpoint", s.get("checkpoint")))
    if s.get("stopped_by"):
        rows.append(("to continue", "the same command with --resume auto"))
    return rows


# ----------------------------------------------------------------------------- CLI
def add_job_arguments(p, recipes: Recipes, set_example: str) -> None:
    """The arguments every training command takes (pretrain, finetune)."""
    p.add_argument("--recipe", default="default",
                   help=f"named recipe ({', '.join(recipes.names())}); default: the embedded run")
    p.add_argument("--list-recipes", action="store_true", help=f"list the {recipes.job} recipes and exit")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON settings over the recipe's: a config as --print-config prints it, a run folder (its "
                        "config.json), or any subset such as {\"optim\": {\"lr\": 1e-4}}; --set applies on top")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted override, repeatable (a tuple as a,b), e.g. {set_example}")
    p.add_argument("--resume", default="", metavar="auto|DIR",
                   help="continue exactly from a checkpoint folder, a run folder's latest, or 'auto' (the run's own)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def print_recipes(recipes: Recipes) -> None:
    width = max(map(len, recipes.names()))
    for name, doc in recipes.describe().items():
        print(f"{name:<{width}}  {doc}")


def run_job(command: str, recipes: Recipes, job, args) -> int:
    """List the recipes, or build the config from ``args`` and print it or run ``job(cfg, resume=...)``;
    bad input -> message, exit 2; a diverged run -> message, exit 1; a run stopped by a signal after writing
    its checkpoint -> 128 + the signal's number, as a shell reports a process the signal ended (130: Ctrl-C)."""
    if args.list_recipes:
        print_recipes(recipes)
        return 0
    try:
        cfg = recipes.build(args.recipe, args.overrides, args.config)
    except (ConfigError, ValueError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from bevt.config import to_json

        print(to_json(cfg))
        return 0
    try:
        summary = job(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by"):  # a signal's name, or a phrase when another process got it (as SIGTERM)
        return 128 + getattr(signal, summary["stopped_by"], signal.SIGTERM)
    return 0
