"""``bevt tokenizer train``: train bevt's VQ tokenizer on the tokenizer copies of a dataset's frames.

The frames are the 112x112 (``data.tok_size``) copies of augmented crops, exactly what the tokenizer sees
in pretraining; the dataset and its sizes come from a pretraining recipe and overrides, as ``bevt pretrain``.
"""
from __future__ import annotations

import argparse
import sys

from bevt.cli import int_at_least


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _device_name(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N (whether that GPU exists is checked in run)."""
    if text == "auto":
        return text
    import torch

    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_arguments(p) -> None:
    # Every value is checked as it is parsed, so a bad one stops the command before any data is read.
    p.add_argument("--recipe", default="default", help="pretraining recipe whose data settings to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of that recipe, e.g. --set data.root=/data/k400")
    p.add_argument("--out", required=True, help="tokenizer file to write (.safetensors)")
    p.add_argument("--vocab-size", type=int_at_least(2), default=None,
                   help="codebook size, >= 2 (default: tokenizer.vocab_size)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="training steps (default: tokenizer.train_steps)")
    p.add_argument("--frames", type=int_at_least(1), default=4096, help="frames to collect from the dataset")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--device", type=_device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    import os

    import torch

    from bevt.config import ConfigError
    from bevt.tokenizers import train_vq_tokenizer
    from bevt.train.distributed import DistInfo
    from bevt.train.job import resolve_device, unwritable_folder
    from bevt.train.pretrain import build_config, ensure_dataset, tokenizer_frames

    if os.path.isdir(args.out):
        print(f"bevt tokenizer train: --out {args.out} is a folder; give a file name ending in .safetensors",
              file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.overwrite:
        print(f"bevt tokenizer train: {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    if not args.out.endswith(".safetensors"):
        print(f"bevt tokenizer train: --out must end with .safetensors, got {args.out!r}", file=sys.stderr)
        return 2
    problem = unwritable_folder(os.path.dirname(os.path.abspath(args.out)))
    if problem:  # before the training, not when its result is saved
        print(f"bevt tokenizer train: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args.recipe, args.overrides)
        if args.device.startswith("cuda") and (torch.device(args.device).index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {args.device}: no such GPU here ({torch.cuda.device_count()} visible); "
                              f"use --device cpu or auto")
        device = resolve_device(args.device)
        # `is None`, not `or`: only an omitted option takes the recipe's value.
        vocab = cfg.tokenizer.vocab_size if args.vocab_size is None else args.vocab_size
        steps = cfg.tokenizer.train_steps if args.steps is None else args.steps
        ensure_dataset(cfg, DistInfo())
        frames = tokenizer_frames(cfg, max_frames=args.frames)
        print(f"training a {vocab}-code VQ tokenizer on {frames.shape[0]} frames of {tuple(frames.shape[2:])} "
              f"for {steps} steps on {device}", file=sys.stderr)
        tok, history = train_vq_tokenizer(frames, vocab_size=vocab, steps=steps, batch_size=args.batch_size,
                                          lr=args.lr, seed=cfg.run.seed, device=device)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"bevt tokenizer train: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    last = history[-1] if history else {}
    print(f"wrote {args.out}: loss {history[0]['loss']:.4f} -> {last.get('loss', float('nan')):.4f}, "
          f"perplexity {last.get('perplexity', float('nan')):.0f}, codes used {last.get('usage', float('nan')):.0%}")
    return 0
