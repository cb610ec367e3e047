"""The tokenizer interface: uint8 frames in, codebook ids out.

BEVT's targets are the ids of a frozen image tokenizer: every frame of a clip and every image, resized
to 112x112 (a lanczos copy of the augmented 224 crop, raw 0..255 RGB), becomes a 14x14 grid of ids of
an 8192-way codebook (REFERENCE_BEVT.md section 2). Two tokenizers implement :class:`Tokenizer`:

* :class:`bevt.tokenizers.dalle.DalleTokenizer`, the DALL-E dVAE encoder the paper uses, loaded from
  OpenAI's published ``encoder.pkl`` (or from a safetensors copy of it);
* :class:`bevt.tokenizers.vq.VQTokenizer`, a small VQ-VAE that ``bevt tokenizer train`` fits on the
  user's own frames (for users without the DALL-E weights, and for the embedded CPU default).

A tokenizer is frozen: no parameter needs grad, and ``train()`` leaves it in eval mode. It maps pixels
itself (each tokenizer has its own mapping), runs under ``torch.no_grad``, and picks its precision from
its device: fp32 on the CPU, autocast to fp16/bf16 on CUDA (``compute_dtype`` overrides it). Move it
with ``.to(device)``; :func:`load_tokenizer` also makes its weights channels-last on CUDA.

Shape legend: N images, C channels (3), H, W pixels; h = H/8, w = W/8 token grid; V codebook size.
"""
from __future__ import annotations

import abc
import os

import torch
from torch import nn

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

DALLE_HOWTO = (
    "bevt does not download the DALL-E weights: download encoder.pkl from OpenAI's DALL-E release "
    "(https://cdn.openai.com/dall-e/encoder.pkl) yourself and point the tokenizer path at it, "
    "or train the built-in VQ tokenizer on your own frames with `bevt tokenizer train`"
)
VQ_HOWTO = "train a VQ tokenizer on your own frames with `bevt tokenizer train` (it writes this file)"
ANY_TOKENIZER_HOWTO = f"{VQ_HOWTO}; or, for the paper's tokenizer, {DALLE_HOWTO}"


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` (auto), a torch dtype, or one of "fp32", "fp16", "bf16" (config strings)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"tokenizer compute dtype must be fp32, fp16 or bf16, got {dtype}")
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown tokenizer dtype {dtype!r}; use one of auto, {', '.join(DTYPE_NAMES)}") from None


def check_images(x_NCHW: torch.Tensor, channels: int = 3, downsample: int = 8) -> None:
    """Raise ValueError unless ``x`` is a uint8 (N, channels, H, W) batch with H, W multiples of ``downsample``."""
    if not isinstance(x_NCHW, torch.Tensor):
        raise ValueError(f"tokenizer input must be a torch.Tensor, got {type(x_NCHW).__name__}")
    if x_NCHW.dtype != torch.uint8:
        raise ValueError(f"tokenizer input must be uint8 pixels in 0..255 (the raw 112x112 copy, before "
                         f"Normalize); got dtype {x_NCHW.dtype}")
    if x_NCHW.dim() != 4:
        raise ValueError(f"tokenizer input must be (N, {channels}, H, W); got shape {tuple(x_NCHW.shape)} "
                         f"(flatten clips to frames first: (B*T, {channels}, H, W))")
    n, c, h, w = x_NCHW.shape
    if c != channels:
        raise ValueError(f"tokenizer input must have {channels} channels (RGB, channels first); got shape "
                         f"{tuple(x_NCHW.shape)}")
    if h == 0 or w == 0 or h % downsample or w % downsample:
        raise ValueError(f"tokenizer input height and width must be positive multiples of {downsample}; got "
                         f"{h}x{w}")


# ------------------------------------------------------------------------------------ unreadable files
def unreadable_file_error(path: str, expected: str, problem: str, howto: str) -> ValueError:
    """The error for a file that exists but does not read as ``expected`` (e.g. "a safetensors file").

    ``problem`` is the reader's failure in words; a file that is visibly empty or a web page is named as
    such instead, the usual results of a failed download. ``howto`` says how to get a good file.
    """
    return ValueError(f"{path!r} is not {expected} ({_visible_problem(path) or problem}); {howto}")


def _visible_problem(path: str) -> str | None:
    """What is wrong with a weights file at a glance (empty, or text starting with '<'), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if size == 0:
        return "the file is empty, 0 bytes: an interrupted download or copy?"
    # No weights format starts with '<' (pickle, zip and safetensors files start with binary headers);
    # HTML and XML do: a download or error page saved under the file's name.
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return f"it is a web page, {size} bytes of HTML or XML text saved in place of the file: not weights"
    return None


def read_safetensors_metadata(path: str, howto: str) -> dict:
    """The metadata of a safetensors file; a file that is not one raises :func:`unreadable_file_error`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        problem = f"damaged, cut short or another format: {e}"
        raise unreadable_file_error(path, "a safetensors file", problem, howto) from None


class Tokenizer(nn.Module, abc.ABC):
    """A frozen image tokenizer: ``encode(x_NCHW uint8) -> ids_Nhw int64`` in ``[0, vocab_size)``.

    Subclasses build their modules, then call :meth:`freeze`; they implement :meth:`_encode_chunk`
    (uint8 on the tokenizer's device -> ids, already under no_grad and autocast) and ``vocab_size``.
    """

    downsample: int = 8
    input_channels: int = 3
    default_cuda_dtype: torch.dtype = torch.bfloat16

    def __init__(self, compute_dtype: torch.dtype | str | None = None, chunk_size: int | None = None,
                 compile: bool = False):
        super().__init__()
        self.compute_dtype = parse_dtype(compute_dtype)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.compile = compile
        self._compiled = None  # torch.compile of _encode_chunk, made on the first CUDA encode

    # -------------------------------------------------------------------------------- interface
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of codebook entries V: ids are in [0, V)."""

    @abc.abstractmethod
    def _encode_chunk(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) on the tokenizer's device -> int64 ids (n, H/8, W/8)."""

    # -------------------------------------------------------------------------------- frozen module
    def freeze(self) -> "Tokenizer":
        """No gradients and eval mode, for good (``train()`` is a no-op on a tokenizer)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Tokenizer":
        # A parent model's .train() reaches here: the tokenizer stays in eval mode (as BEVT's head does).
        return super().train(False)

    # -------------------------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def autocast_dtype(self) -> torch.dtype:
        """The dtype the convolutions run in on the current device (fp32 on the CPU unless asked)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return self.default_cuda_dtype if self.device.type == "cuda" else torch.float32

    def default_chunk_size(self) -> int:
        return 256 if self.device.type == "cuda" else 64

    # -------------------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Token ids of a batch of images.

        Args:
            x_NCHW: uint8 (N, 3, H, W) pixels 0..255 on any device; H and W multiples of 8.
        Returns:
            int64 (N, H/8, W/8) ids in [0, vocab_size), on the tokenizer's device.
        """
        check_images(x_NCHW, self.input_channels, self.downsample)
        device = self.device
        n = x_NCHW.shape[0]
        if n == 0:
            return torch.empty(0, x_NCHW.shape[2] // self.downsample, x_NCHW.shape[3] // self.downsample,
                               dtype=torch.long, device=device)
        dtype = self.autocast_dtype()
        chunk = self.chunk_size or self.default_chunk_size()
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        outs = []
        for start in range(0, n, chunk):
            # uint8 crosses to the device (4x fewer bytes than float); pixel mapping happens there.
            x = x_NCHW[start:start + chunk].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                outs.append(self._chunk_fn(device)(x))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _chunk_fn(self, device: torch.device):
        """``_encode_chunk``, compiled on CUDA when ``compile`` is set (fuses the ReLU/residual/scale
        element-wise work between cuDNN convs: 1.6x faster for DALL-E on an H100, see docs/tokenizers.md)."""
        if not (self.compile and device.type == "cuda"):
            return self._encode_chunk
        if self._compiled is None:
            self._compiled = torch.compile(self._encode_chunk)
        return self._compiled

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_compiled"] = None  # a compiled function neither pickles nor copies
        return state

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.encode(x_NCHW)

    def extra_repr(self) -> str:
        dtype = "auto" if self.compute_dtype is None else str(self.compute_dtype).replace("torch.", "")
        return (f"vocab_size={self.vocab_size}, downsample={self.downsample}, compute_dtype={dtype}, "
                f"compile={self.compile}")


# ------------------------------------------------------------------------------------ loading
def _split_spec(path_or_spec: str | os.PathLike) -> tuple[str | None, str]:
    """'dalle:/x/encoder.pkl' -> ('dalle', '/x/encoder.pkl'); a plain path -> (None, path)."""
    text = os.fspath(path_or_spec)
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() in ("dalle", "vq"):
        return kind.lower(), rest
    return None, text


def load_tokenizer(path_or_spec: str | os.PathLike, device: torch.device | str | None = None,
                   compute_dtype: torch.dtype | str | None = None, compile: bool = False) -> Tokenizer:
    """Load a frozen tokenizer from a file, on ``device`` (channels-last weights on CUDA).

    ``compute_dtype``: None (auto: fp16 for DALL-E, bf16 for VQ on CUDA; fp32 on the CPU), "fp32", "fp16"
    or "bf16". ``compile``: torch.compile the encoder on CUDA (pays for long runs; the first batches of
    each new batch size wait for the compiler).

    ``path_or_spec``: a path, optionally prefixed with its kind (``dalle:`` or ``vq:``). Without a prefix
    the kind comes from the file: ``.pkl`` is OpenAI's DALL-E ``encoder.pkl``; a ``.safetensors`` file
    says in its metadata whether it is a bevt VQ tokenizer or a DALL-E encoder copy; ``.pt``/``.pth`` is
    a state dict of :class:`~bevt.tokenizers.dalle.DalleEncoder`.
    """
    from bevt.tokenizers import dalle, vq  # here, not at the top: both import this module

    kind, path = _split_spec(path_or_spec)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        if kind == "dalle" or ext in (".pkl", ".pt", ".pth"):
            howto = DALLE_HOWTO
        elif kind == "vq":
            howto = VQ_HOWTO
        else:
            howto = ANY_TOKENIZER_HOWTO
        raise FileNotFoundError(f"tokenizer file not found: {path!r}. {howto}.")

    if kind is None:
        if ext == ".pkl":
            kind = "dalle"
        elif ext == ".safetensors":
            # A damaged file is reported here, naming both kinds: its kind is in the metadata it lacks.
            meta = read_safetensors_metadata(path, ANY_TOKENIZER_HOWTO)
            kind = "vq" if meta.get("format") == vq.SAFETENSORS_FORMAT else "dalle"
        elif ext in (".pt", ".pth"):
            kind = "dalle"
        else:
            raise ValueError(f"cannot tell the tokenizer kind of {path!r} from its extension {ext!r}: expected "
                             f".pkl (DALL-E encoder.pkl), .safetensors (bevt tokenizer file) or .pt/.pth (a "
                             f"DalleEncoder state dict); or prefix the path with 'dalle:' or 'vq:'")
    if kind == "vq":
        tok: Tokenizer = vq.VQTokenizer.load(path, compute_dtype=compute_dtype)
    else:
        tok = dalle.DalleTokenizer(dalle.load_dalle_encoder(path), compute_dtype=compute_dtype)
    tok.compile = compile
    if device is not None:
        device = torch.device(device)
        tok = tok.to(device)
        if device.type == "cuda":
            tok = tok.to(memory_format=torch.channels_last)
    return tok
