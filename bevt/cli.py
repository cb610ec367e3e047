"""The ``bevt`` command. Each subcommand lives in its module, which provides ``add_arguments(parser)``
and ``run(args) -> int``; this file only maps names to modules.

    bevt info                      versions, devices, kernel backends (and why not)
    bevt pretrain                  BEVT pretraining (no arguments: the embedded default)
    bevt data synth                write the built-in synthetic dataset
    bevt tokenizer train           train bevt's VQ tokenizer on a dataset's frames
    bevt finetune / eval           classification fine-tuning and multi-view evaluation
    bevt analyze temporal          the paper's Table 2 test (single frame, shuffled frames)
    bevt reproduce                 small-scale BEVT vs BEVT-I vs BEVT-V study on the built-in data
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# name -> (module, help); nested groups are dicts
COMMANDS: dict[str, object] = {
    "info": ("bevt.info", "versions, devices and which kernel backends can run here"),
    "pretrain": ("bevt.train.pretrain", "BEVT pretraining (no arguments: the embedded default run)"),
    "data": {"synth": ("bevt.data.synth", "write the built-in synthetic video/image dataset")},
    "tokenizer": {"train": ("bevt.tokenizers.cli", "train bevt's VQ tokenizer on a dataset's frames")},
    "finetune": ("bevt.train.finetune", "fine-tune a (BEVT-pretrained) Video Swin classifier"),
    "eval": ("bevt.eval.evaluate", "evaluate a classifier: top-1/top-5, multi-view, confusion"),
    "analyze": {"temporal": ("bevt.eval.analyze", "temporal-dependency analysis (paper Table 2)")},
    "reproduce": ("bevt.eval.reproduce", "small-scale BEVT / BEVT-I / BEVT-V study with the temporal analysis"),
}


def int_at_least(minimum: int):
    """argparse ``type=`` for the commands' count options: an integer >= ``minimum`` (argparse names the
    option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _usage(prefix: str, tree: dict) -> str:
    lines = [f"usage: {prefix} COMMAND [options]", "", "commands:"]
    for name, spec in tree.items():
        if isinstance(spec, dict):
            for k, (_, help_text) in spec.items():
                lines.append(f"  {name + ' ' + k:<22} {help_text}")
        else:
            lines.append(f"  {name:<22} {spec[1]}")
    lines.append("")
    lines.append(f"'{prefix} COMMAND --help' describes a command's options.")
    return "\n".join(lines)


def _format_bevt_warnings() -> None:
    """Print bevt's own warnings (a skipped file, a batch run eagerly, ...) as one ``bevt: ...`` line instead of
    Python's file:line form, whose source line is often torch's (a loader worker) and says nothing. Loader
    workers forked from here inherit it."""
    if getattr(warnings.formatwarning, "_bevt", False):
        return
    plain = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if category.__module__.startswith("bevt."):
            return f"bevt: {message}\n"
        return plain(message, category, filename, lineno, line)

    formatwarning._bevt = True
    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    """Find the command in argv, then import only its module (a broken optional module never breaks others)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _format_bevt_warnings()
    tree, prefix = COMMANDS, "bevt"
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(prefix, tree))
            return 0 if argv else 2
        name = argv.pop(0)
        if name not in tree:
            print(f"{prefix}: unknown command {name!r}\n\n" + _usage(prefix, tree), file=sys.stderr)
            return 2
        spec, prefix = tree[name], f"{prefix} {name}"
        if isinstance(spec, dict):
            tree = spec
            continue
        break
    module, help_text = spec
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"{prefix}: this command is unavailable here: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=prefix, description=help_text)
    mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (``bevt pretrain --print-config | head``)
        # point stdout at /dev/null so that the interpreter's last flush does not fail again on exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a program the signal ended


if __name__ == "__main__":
    sys.exit(main())
