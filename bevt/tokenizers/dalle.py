"""The DALL-E dVAE encoder (the tokenizer of the BEVT paper), and a safe loader for OpenAI's ``encoder.pkl``.

Architecture (OpenAI's ``dall_e`` package, restated here; parameter names kept so files map 1:1)::

    blocks.input            Conv2d 7x7, 3 -> n_hid
    blocks.group_1          2 x EncoderBlock(n_hid -> n_hid),     pool (2x2 max)
    blocks.group_2          2 x EncoderBlock(-> 2 n_hid),         pool
    blocks.group_3          2 x EncoderBlock(-> 4 n_hid),         pool
    blocks.group_4          2 x EncoderBlock(-> 8 n_hid)
    blocks.output           ReLU, Conv2d 1x1, 8 n_hid -> vocab_size          (logits over the codebook)

    EncoderBlock(n_in -> n_out):  id_path(x) + post_gain * res_path(x),  post_gain = 1 / n_layers**2
        id_path   Conv2d 1x1 if n_in != n_out, else identity;   n_layers = group_count * n_blk_per_group
        res_path  relu_1, conv_1 3x3 (n_in -> n_out/4), relu_2, conv_2 3x3, relu_3, conv_3 3x3,
                  relu_4, conv_4 1x1 (-> n_out)

Each Conv2d holds ``w`` (n_out, n_in, kw, kw) and ``b`` (n_out,), padding (kw - 1) // 2. The published
model has n_hid 256, 2 blocks per group, vocab 8192: 8x downsampling, so 112x112 -> 14x14 ids. Its
input is ``map_pixels(x / 255)``. On CUDA, DALL-E runs every conv in fp16 except the output conv (fp32);
:class:`DalleTokenizer` does the same by default (autocast fp16, output conv in fp32).

``encoder.pkl`` is a pickled module object whose classes live in the ``dall_e`` package. It is loaded
here without that package and without running arbitrary code: a restricted unpickler maps the three
``dall_e`` classes to inert stand-ins and accepts only an explicit allowlist of other globals.

Shape legend: N images, H, W pixels, h, w token grid (H/8, W/8), V vocab size.
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import json
import os
import pickle
import types
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bevt.tokenizers.base import (DALLE_HOWTO, Tokenizer, check_images, read_safetensors_metadata,
                                  unreadable_file_error)

LOGIT_LAPLACE_EPS = 0.1
SAFETENSORS_FORMAT = "bevt-dalle-encoder"


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's input mapping of [0, 1] pixels: ``(1 - 2 eps) x + eps`` (into [0.1, 0.9])."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


# ------------------------------------------------------------------------------------ the model
class DalleConv2d(nn.Module):
    """DALL-E's conv: parameters ``w`` (n_out, n_in, kw, kw) and ``b`` (n_out,), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kernel width must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if x.is_cuda and self.n_in % CUDA_CHANNEL_MULTIPLE:
            x, w = pad_input_channels(x, w, CUDA_CHANNEL_MULTIPLE)
        return F.conv2d(x, w, self.b, padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}"


# cuDNN runs the 3-channel input conv (7x7, NHWC) on a slow non-tensor-core kernel; with the channels
# zero-padded to 4 it takes a tensor-core one: 3.99 -> 2.75 ms for 128 images of 112x112 in fp16 on an H100;
# the compiled DALL-E encoder on a BEVT-B step's 192 frames, 32.8 -> 30.9 ms (2026-11-23). Exact in exact
# arithmetic (the extra channels multiply zero weights); in fp16 the other kernel rounds differently, which
# moved 0.07 % of the ids of random-weight logits (near-ties), as switching cuDNN algorithms does.
CUDA_CHANNEL_MULTIPLE = 4


def pad_input_channels(x: torch.Tensor, w: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the channels of x (N, C, H, W) and the input channels of w (O, C, k, k) to a multiple; x keeps
    its memory format (channels-last stays channels-last)."""
    pad = -x.shape[1] % multiple
    if pad == 0:
        return x, w
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return (F.pad(x, (0, 0, 0, 0, 0, pad)).contiguous(memory_format=fmt), F.pad(w, (0, 0, 0, 0, 0, pad)))


class DalleEncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: mapped pixels (N, 3, H, W) float -> logits (N, V, H/8, W/8).

    ``fp32_logits``: run the output conv in fp32 even under autocast, as DALL-E does on CUDA.
    """

    group_count = 4  # the architecture has four groups; OpenAI's field only enters n_layers

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192,
                 input_channels: int = 3, fp32_logits: bool = True):
        super().__init__()
        if n_hid < 1 or n_blk_per_group < 1 or vocab_size < 2 or input_channels < 1:
            raise ValueError(f"bad DALL-E encoder size: n_hid={n_hid}, n_blk_per_group={n_blk_per_group}, "
                             f"vocab_size={vocab_size}, input_channels={input_channels}")
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.vocab_size, self.input_channels = vocab_size, input_channels
        self.fp32_logits = fp32_logits
        n_layers = self.group_count * n_blk_per_group

        def group(n_in: int, n_out: int, pool: bool) -> nn.Sequential:
            layers = [(f"block_{i + 1}", DalleEncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(input_channels, n_hid, 7)),
            ("group_1", group(n_hid, n_hid, pool=True)),
            ("group_2", group(n_hid, 2 * n_hid, pool=True)),
            ("group_3", group(2 * n_hid, 4 * n_hid, pool=True)),
            ("group_4", group(4 * n_hid, 8 * n_hid, pool=False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", DalleConv2d(8 * n_hid, vocab_size, 1)),
            ]))),
        ]))

    def config(self) -> dict:
        return {"n_hid": self.n_hid, "n_blk_per_group": self.n_blk_per_group, "vocab_size": self.vocab_size,
                "input_channels": self.input_channels}

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        h = x_NCHW
        for name, module in self.blocks.named_children():
            if name == "output" and self.fp32_logits and torch.is_autocast_enabled(h.device.type):
                with torch.autocast(h.device.type, enabled=False):
                    return module(h.float())
            h = module(h)
        return h

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights as safetensors, the config in its metadata (a safe, fast copy of encoder.pkl)."""
        from safetensors.torch import save_file

        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.fspath(path), metadata={"format": SAFETENSORS_FORMAT, "config": json.dumps(self.config())})


class DalleTokenizer(Tokenizer):
    """Frozen DALL-E encoder: uint8 (N, 3, H, W) -> ids (N, H/8, W/8) = argmax of the logits.

    Pixels are mapped as BEVT's pipeline does (``x / 255``, then :func:`map_pixels`). On CUDA the convs run
    in fp16 by default, as DALL-E's own code does (``compute_dtype="bf16"`` to change it), the output conv in
    fp32 unless the encoder was built with ``fp32_logits=False``.
    """

    default_cuda_dtype = torch.float16

    def __init__(self, encoder: DalleEncoder, compute_dtype: torch.dtype | str | None = None,
                 chunk_size: int | None = None, compile: bool = False):
        super().__init__(compute_dtype=compute_dtype, chunk_size=chunk_size, compile=compile)
        self.encoder = encoder
        self.input_channels = encoder.input_channels
        self.freeze()

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def _preprocess(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return map_pixels(x_NCHW.float() / 255)

    def _encode_chunk(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._preprocess(x_NCHW)).argmax(dim=1)

    @torch.no_grad()
    def logits(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """fp32 logits (N, V, H/8, W/8) of uint8 images, in one chunk (for tests and inspection)."""
        check_images(x_NCHW, self.input_channels, self.downsample)
        x = x_NCHW.to(self.device)
        dtype = self.autocast_dtype()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.encoder(self._preprocess(x)).float()

    def save(self, path: str | os.PathLike) -> None:
        self.encoder.save(path)


# ------------------------------------------------------------------------------------ safe unpickling
class _PickledEncoder(nn.Module):
    """Stand-in for ``dall_e.encoder.Encoder``: receives the pickled state, runs nothing."""


class _PickledEncoderBlock(nn.Module):
    """Stand-in for ``dall_e.encoder.EncoderBlock``."""


class _PickledConv2d(nn.Module):
    """Stand-in for ``dall_e.utils.Conv2d``."""


_STAND_INS = {
    ("dall_e.encoder", "Encoder"): _PickledEncoder,
    ("dall_e.encoder", "EncoderBlock"): _PickledEncoderBlock,
    ("dall_e.utils", "Conv2d"): _PickledConv2d,
}


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every global besides the stand-ins that an encoder.pkl may name (old and new torch versions)."""
    import torch._utils as tu

    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
        ("torch.nn.modules.container", "Sequential"): nn.Sequential,
        ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
        ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
        ("torch.nn.modules.linear", "Identity"): nn.Identity,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
        ("torch._utils", "_rebuild_tensor"): tu._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): tu._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): tu._rebuild_parameter,
    }
    if hasattr(tu, "_rebuild_parameter_with_state"):
        allowed[("torch._utils", "_rebuild_parameter_with_state")] = tu._rebuild_parameter_with_state
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the DALL-E encoder allowlist: it is not loaded.

    A ValueError too, like every other bad tokenizer file: the commands report those in one line.
    """


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's) spell Python 2 names (__builtin__.set): map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _STAND_INS:
            return _STAND_INS[key]
        allowed = _allowed_globals()
        if key in allowed:
            return allowed[key]
        hint = ""
        if module.startswith("dall_e.decoder") or name.startswith("Decoder"):
            hint = " This looks like DALL-E's decoder.pkl: the tokenizer needs encoder.pkl."
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}' from the pickle: only the DALL-E encoder classes "
            f"and torch's tensor/module rebuild helpers are allowed (this loader never runs code from a "
            f"pickle).{hint}")


def _restricted_pickle_module() -> types.ModuleType:
    """A pickle-like module for ``torch.load(pickle_module=...)``: its Unpickler and load are restricted."""
    mod = types.ModuleType("bevt_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler
    mod.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
    mod.loads = lambda data, **kwargs: _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


# torch.load's messages for the usual ways a file goes bad -> what that means, in words
_TORCH_LOAD_SYMPTOMS = (
    (("EOFError", "truncated", "Ran out of input", "unexpected EOF", "central directory"),
     "it is cut short: an interrupted download or copy?"),
    (("Invalid magic number", "not a ZIP archive"),
     "it is not a file torch.save wrote: a plain pickle of something else, or another format"),
    (("Weights only load failed",), "it is not a torch.save'd dict of tensors: weights-only loading refused it"),
)


def _torch_load_problem(error: Exception, path: str) -> str:
    """A torch.load failure in words, with the first sentence of torch's own message."""
    message = str(error)
    detail = f"{type(error).__name__}: {message.split('. ')[0][:160]}" if message else type(error).__name__
    if _is_cut_short_zip(path):  # torch's zip reader fails on those with several messages, some opaque
        return f"{_TORCH_LOAD_SYMPTOMS[0][1]} [{detail}]"
    for symptoms, meaning in _TORCH_LOAD_SYMPTOMS:
        if any(s in detail for s in symptoms):
            return f"{meaning} [{detail}]"
    return f"it is damaged or another kind of file [{detail}]"


_ZIP_START, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # a zip's first local header; its end-of-directory record
_ZIP_END_MAX_DISTANCE = 22 + 0xFFFF  # the end record (22 bytes and a comment of at most 64 KiB) closes the file


def _is_cut_short_zip(path: str) -> bool:
    """True for a zip file (torch.save's format) that lacks its end record: the end of it is missing."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_START)) != _ZIP_START:
                return False
            f.seek(max(0, os.path.getsize(path) - _ZIP_END_MAX_DISTANCE))
            return _ZIP_END not in f.read()
    except OSError:
        return False


def _torch_load(path: str, expected: str, **kwargs):
    """``torch.load`` on the CPU; a file it cannot read raises one ValueError naming the path, what is wrong
    with the file and how to get a good one (``expected`` names the kind of file, e.g. "a DALL-E encoder.pkl")."""
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path!r} is not {expected}: {e} {DALLE_HOWTO}.") from None
    except Exception as e:  # noqa: BLE001 -- a damaged file fails anywhere in torch's reader, with any type
        raise unreadable_file_error(path, expected, _torch_load_problem(e, path), DALLE_HOWTO) from None


def _read_openai_pickle(path: str) -> DalleEncoder:
    from torch.serialization import SourceChangeWarning

    with warnings.catch_warnings():
        # Legacy-format pickles carry the source of each module class; ours differ by design.
        warnings.simplefilter("ignore", SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        obj = _torch_load(path, "a DALL-E encoder pickle", weights_only=False,
                          pickle_module=_restricted_pickle_module())
    if not isinstance(obj, _PickledEncoder):
        raise ValueError(f"{path!r} is not a DALL-E encoder pickle: its top-level object is a "
                         f"{type(obj).__module__}.{type(obj).__qualname__}, expected dall_e.encoder.Encoder; "
                         f"{DALLE_HOWTO}")
    try:
        n_hid, n_blk, vocab = int(obj.n_hid), int(obj.n_blk_per_group), int(obj.vocab_size)
        group_count = int(getattr(obj, "group_count", 4))
        input_channels = int(getattr(obj, "input_channels", 3))
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path!r}: the pickled DALL-E encoder lacks a hyper-parameter or has a bad one ({e}); "
                         f"{DALLE_HOWTO}") from None
    if group_count != DalleEncoder.group_count:
        raise ValueError(f"{path!r}: DALL-E encoder with group_count={group_count}; only 4 groups exist")
    try:
        blocks = [m for m in obj.modules() if isinstance(m, _PickledEncoderBlock)]
        state = obj.state_dict()
    except (AttributeError, KeyError, TypeError) as e:
        # The stand-in modules take whatever state the pickle gives them: a damaged module tree fails here.
        raise ValueError(f"{path!r} is not a complete DALL-E encoder pickle: its module tree is damaged "
                         f"({type(e).__name__}: {e}); {DALLE_HOWTO}") from None
    expected_gain = 1 / (group_count * n_blk) ** 2
    for m in blocks:
        if abs(float(getattr(m, "post_gain", expected_gain)) - expected_gain) > 1e-12:
            raise ValueError(f"{path!r}: an encoder block has post_gain {m.post_gain}, expected {expected_gain}")
    encoder = DalleEncoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab, input_channels=input_channels)
    _load_state(encoder, state, path)
    return encoder


def _load_state(encoder: DalleEncoder, state: dict, path: str) -> None:
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path!r} is not a DALL-E encoder: {not_tensors[:5]} hold no tensors; {DALLE_HOWTO}")
    state = {k: v.float() for k, v in state.items()}
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # weights of other shapes than the file's own hyper-parameters say
        raise ValueError(f"{path!r} does not match a DALL-E encoder of {encoder.config()}: {e}; "
                         f"{DALLE_HOWTO}") from None
    if missing or unexpected:
        raise ValueError(f"{path!r} does not match a DALL-E encoder of {encoder.config()}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def _config_from_state(state: dict, path: str) -> dict:
    """Infer the hyper-parameters of a DalleEncoder state dict from its weight shapes."""
    try:
        n_hid, input_channels = state["blocks.input.w"].shape[:2]
        vocab_size = state["blocks.output.conv.w"].shape[0]
    except (KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{path!r} is not a complete DalleEncoder state dict (its input or output conv weight "
                         f"is missing or malformed: {e}); {DALLE_HOWTO}") from None
    n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    return {"n_hid": n_hid, "n_blk_per_group": n_blk, "vocab_size": vocab_size, "input_channels": input_channels}


def load_dalle_encoder(path: str | os.PathLike) -> DalleEncoder:
    """A DalleEncoder (fp32, CPU) from OpenAI's ``encoder.pkl``, or from a safetensors / state-dict copy.

    ``.pkl``: the pickled ``dall_e`` module, read with a restricted unpickler (no ``dall_e`` package needed,
    no code run). ``.safetensors``: written by :meth:`DalleEncoder.save`. ``.pt``/``.pth``: a state dict of
    :class:`DalleEncoder` (loaded with ``weights_only=True``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DALL-E encoder not found: {path!r}. {DALLE_HOWTO}.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        meta = read_safetensors_metadata(path, DALLE_HOWTO)  # first: a damaged file is reported as such
        state = load_file(path)
        if meta.get("format") not in (None, SAFETENSORS_FORMAT):
            raise ValueError(f"{path!r} is a {meta['format']!r} file, not a DALL-E encoder")
        config = json.loads(meta["config"]) if "config" in meta else _config_from_state(state, path)
        encoder = DalleEncoder(**config)
        _load_state(encoder, state, path)
        return encoder
    if ext in (".pt", ".pth"):
        state = _torch_load(path, "a DalleEncoder state dict", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or "blocks.input.w" not in state:
            raise ValueError(f"{path!r} is not a DalleEncoder state dict (no 'blocks.input.w')")
        encoder = DalleEncoder(**_config_from_state(state, path))
        _load_state(encoder, state, path)
        return encoder
    return _read_openai_pickle(path)
