"""``bevt tokenizer train``: train bevt's VQ tokenizer on the tokenizer copies of a dataset's frames.

The frames are the 112x112 (``data.tok_size``) copies of augmented crops, exactly what the tokenizer sees
in pretraining; the dataset and its sizes come from a pretraining recipe and overrides, as ``bevt pretrain``.
"""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="default", help="pretraining recipe whose data settings to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of that recipe, e.g. --set data.root=/data/k400")
    p.add_argument("--out", required=True, help="tokenizer file to write (.safetensors)")
    p.add_argument("--vocab-size", type=int, default=None, help="codebook size (default: tokenizer.vocab_size)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: tokenizer.train_steps)")
    p.add_argument("--frames", type=int, default=4096, help="frames to collect from the dataset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    import os

    from bevt.config import ConfigError
    from bevt.tokenizers import train_vq_tokenizer
    from bevt.train.distributed import DistInfo
    from bevt.train.pretrain import build_config, ensure_dataset, resolve_device, tokenizer_frames

    if os.path.exists(args.out) and not args.overwrite:
        print(f"bevt tokenizer train: {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    if not args.out.endswith(".safetensors"):
        print(f"bevt tokenizer train: --out must end with .safetensors, got {args.out!r}", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args.recipe, args.overrides)
        device = resolve_device(args.device)
        ensure_dataset(cfg, DistInfo())
        frames = tokenizer_frames(cfg, max_frames=args.frames)
        vocab = args.vocab_size or cfg.tokenizer.vocab_size
        steps = args.steps or cfg.tokenizer.train_steps
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
