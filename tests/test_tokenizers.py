"""Tokenizers: the DALL-E encoder and its safe pickle loader, the built-in VQ tokenizer, the interface."""
from __future__ import annotations

import copy
import decimal
import io
import os
import pickle
import re
import sys
import time
import types
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevt.tokenizers import (DalleEncoder, DalleTokenizer, Tokenizer, UnsafePickleError, VQConfig, VQTokenizer,
                             is_vq_tokenizer_file, load_dalle_encoder, load_tokenizer, map_pixels, parse_dtype,
                             train_vq_tokenizer, unmap_pixels)

FAKE_MODULES = ("dall_e", "dall_e.encoder", "dall_e.utils")


# ------------------------------------------------------------------------------------ fixtures
def _install_fake_dall_e():
    """Register stand-ins for OpenAI's ``dall_e`` package in sys.modules: same class names, module paths,
    attributes and parameter names as the originals (plain attributes where the originals use attrs)."""

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
            w = torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5
            self.w = nn.Parameter(w, requires_grad=requires_grad)
            self.b = nn.Parameter(0.1 * torch.randn(n_out), requires_grad=requires_grad)  # non-zero: tests the bias

        def forward(self, x):
            return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
            self.device, self.requires_grad = device, requires_grad
            self.n_hid = n_out // 4
            self.post_gain = 1 / (n_layers ** 2)
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            h = self.n_hid
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, h, 3)),
                ("relu_2", nn.ReLU()), ("conv_2", Conv2d(h, h, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(h, h, 3)),
                ("relu_4", nn.ReLU()), ("conv_4", Conv2d(h, n_out, 1))]))

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        def __init__(self, n_hid=16, n_blk_per_group=2, vocab_size=64):
            super().__init__()
            self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
            self.input_channels, self.vocab_size = 3, vocab_size
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers = self.group_count * n_blk_per_group

            def group(n_in, n_out, pool):
                layers = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                          for i in range(n_blk_per_group)]
                return nn.Sequential(OrderedDict(layers + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))

            n = n_hid
            self.blocks = nn.Sequential(OrderedDict([
                ("input", Conv2d(3, n, 7)),
                ("group_1", group(n, n, True)), ("group_2", group(n, 2 * n, True)),
                ("group_3", group(2 * n, 4 * n, True)), ("group_4", group(4 * n, 8 * n, False)),
                ("output", nn.Sequential(OrderedDict([
                    ("relu", nn.ReLU()), ("conv", Conv2d(8 * n, vocab_size, 1, use_float16=False))]))),
            ]))

        def forward(self, x):
            return self.blocks(x)

    modules = {name: types.ModuleType(name) for name in FAKE_MODULES}
    for cls, module in ((Conv2d, "dall_e.utils"), (EncoderBlock, "dall_e.encoder"), (Encoder, "dall_e.encoder")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    modules["dall_e"].encoder, modules["dall_e"].utils = modules["dall_e.encoder"], modules["dall_e.utils"]
    sys.modules.update(modules)
    return Encoder


def _remove_fake_dall_e():
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): flat backgrounds with a horizontal ramp and a few discs (learnable, not noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = 0.6 * torch.rand(3, 1, 1, generator=g) + 0.4 * torch.rand(3, 1, 1, generator=g) * (xx / size)[None]
        for _ in range(3):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
            img[:, (xx - cx) ** 2 + (yy - cy) ** 2 < (r + 3) ** 2] = torch.rand(3, 1, generator=g)
        out[i] = img
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def frames48():
    return _images(128, 48)


@pytest.fixture(scope="module")
def trained_vq(frames48):
    torch.manual_seed(123)
    return train_vq_tokenizer(frames48, vocab_size=64, steps=30, batch_size=16, lr=2e-3, seed=0, device="cpu",
                              log_every=10, progress=False)


# ------------------------------------------------------------------------------------ DALL-E
def test_map_pixels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(x)), x)


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_dalle_pickle_round_trip(tmp_path, zipfile_format):
    """An encoder.pkl in OpenAI's format loads without the dall_e package and gives the original's logits."""
    try:
        Encoder = _install_fake_dall_e()
        torch.manual_seed(0)
        original = Encoder(n_hid=8, vocab_size=64).eval()
        x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
        with torch.no_grad():
            expected = original(map_pixels(x.float() / 255))
        path = tmp_path / "encoder.pkl"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy format warns that it cannot save our classes' source
            torch.save(original, path, _use_new_zipfile_serialization=zipfile_format)
    finally:
        _remove_fake_dall_e()
    assert "dall_e" not in sys.modules

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading is quiet
        tok = load_tokenizer(path)
    assert isinstance(tok, DalleTokenizer)
    assert tok.encoder.config() == {"n_hid": 8, "n_blk_per_group": 2, "vocab_size": 64, "input_channels": 3}
    logits = tok.logits(x)
    assert logits.shape == expected.shape and (logits - expected).abs().max() < 1e-5
    ids = tok.encode(x)
    assert ids.shape == (2, 14, 14) and ids.dtype == torch.int64
    assert torch.equal(ids, expected.argmax(1))

    # The safe copies of the same weights: safetensors (with config metadata) and a plain state dict.
    tok.save(tmp_path / "encoder.safetensors")
    torch.save(tok.encoder.state_dict(), tmp_path / "encoder.pt")
    for name in ("encoder.safetensors", "encoder.pt"):
        assert torch.equal(load_tokenizer(tmp_path / name).encode(x), ids), name


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_dalle_pickle_refuses_other_globals(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "encoder.pkl"
    torch.save({"payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '(posix|nt|os)\.system'"):
        load_dalle_encoder(path)
    assert not marker.exists()

    torch.save({"w": torch.zeros(2)}, path)  # only allowed globals, but not an encoder
    with pytest.raises(ValueError, match="not a DALL-E encoder pickle"):
        load_dalle_encoder(path)


def _encoder_pickle_bytes(zipfile_format: bool = True) -> bytes:
    """A small encoder.pkl in OpenAI's format (made with the stand-in dall_e package), as bytes."""
    try:
        Encoder = _install_fake_dall_e()
        torch.manual_seed(0)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy format warns that it cannot save our classes' source
            torch.save(Encoder(n_hid=8, vocab_size=64), buffer, _use_new_zipfile_serialization=zipfile_format)
        return buffer.getvalue()
    finally:
        _remove_fake_dall_e()


HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"


@pytest.mark.parametrize("kind", ["html", "empty", "truncated_zip", "truncated_legacy", "plain_pickle"])
def test_broken_dalle_pickle_says_what_is_wrong(tmp_path, kind):
    """A damaged or wrong encoder.pkl gives one ValueError naming the file, what is wrong with it and where
    a good one comes from: no unpickling error, EOFError or torch internals."""
    contents, problem = {
        "html": (HTML_PAGE, r"a web page, \d+ bytes of HTML"),
        "empty": (b"", "the file is empty, 0 bytes"),
        "truncated_zip": (_encoder_pickle_bytes(True)[:50_000], "cut short"),
        "truncated_legacy": (_encoder_pickle_bytes(False)[:50_000], "cut short"),
        "plain_pickle": (pickle.dumps({"weights": [1.0, 2.0]}), "a plain pickle of something else"),
    }[kind]
    path = tmp_path / "encoder.pkl"
    path.write_bytes(contents)
    for load in (load_dalle_encoder, load_tokenizer):
        with pytest.raises(ValueError) as info:
            load(path)
        message = str(info.value)
        assert type(info.value) is ValueError, message
        assert repr(str(path)) in message and re.search(problem, message), message
        assert "download encoder.pkl" in message and "bevt tokenizer train" in message, message
    assert path.read_bytes() == contents  # reading a bad file never changes it


def test_broken_tokenizer_files_of_other_formats(tmp_path):
    """The same for the safe copies (.pt state dict, .safetensors) and for a pickle that names a foreign
    global: a ValueError (what the commands report in one line) naming the file and the way out."""
    (tmp_path / "encoder.pt").write_bytes(HTML_PAGE)
    with pytest.raises(ValueError, match=r"(?s)encoder\.pt' is not a DalleEncoder state dict \(it is a web page.*"
                                         r"download encoder\.pkl"):
        load_tokenizer(tmp_path / "encoder.pt")
    (tmp_path / "tok.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)tok\.safetensors' is not a safetensors file \(the file is empty.*"
                                         r"bevt tokenizer train.*download encoder\.pkl"):
        load_tokenizer(tmp_path / "tok.safetensors")  # no kind given: both ways to get a good file
    with pytest.raises(ValueError, match=r"(?s)is not a safetensors file \(the file is empty.*bevt tokenizer train"):
        VQTokenizer.load(tmp_path / "tok.safetensors")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps(decimal.Decimal("1.5")))
    with pytest.raises(UnsafePickleError, match=r"(?s)other\.pkl' is not a DALL-E encoder pickle: refusing to "
                                                r"load global 'decimal\.Decimal'.*download encoder\.pkl"):
        load_tokenizer(tmp_path / "other.pkl")
    assert issubclass(UnsafePickleError, ValueError)


def test_missing_files_say_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere/encoder\.pkl.*download encoder\.pkl"):
        load_tokenizer(tmp_path / "nowhere" / "encoder.pkl")
    with pytest.raises(FileNotFoundError, match=r"(?s)vq\.safetensors.*bevt tokenizer train"):
        load_tokenizer(f"vq:{tmp_path / 'vq.safetensors'}")
    with pytest.raises(FileNotFoundError, match="bevt tokenizer train"):
        VQTokenizer.load(tmp_path / "x.safetensors")


def test_dalle_real_size_shapes():
    """The published size (n_hid 256, vocab 8192): 112x112 -> 14x14 ids, 8192-way."""
    torch.manual_seed(0)
    enc = DalleEncoder()
    assert sum(p.numel() for p in enc.parameters()) > 50_000_000  # ~54M parameters
    assert enc.blocks.group_1.block_1.id_path.__class__ is nn.Identity
    assert enc.blocks.group_2.block_1.id_path.w.shape == (512, 256, 1, 1)
    assert enc.blocks.output.conv.w.shape == (8192, 2048, 1, 1)
    names = dict(enc.named_parameters())
    assert "blocks.group_4.block_2.res_path.conv_4.b" in names and "blocks.input.w" in names
    tok = DalleTokenizer(enc)
    x = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    t0 = time.perf_counter()
    ids = tok.encode(x)
    print(f"real-size DALL-E encoder, 1 image on CPU: {time.perf_counter() - t0:.2f} s")
    assert ids.shape == (1, 14, 14) and int(ids.max()) < 8192 and int(ids.min()) >= 0
    assert tok.vocab_size == 8192 and tok.downsample == 8


def test_input_errors():
    tok = DalleTokenizer(DalleEncoder(n_hid=8, vocab_size=16))
    good = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert tok.encode(good).shape == (2, 2, 2)
    assert tok.encode(good[:0]).shape == (0, 2, 2)
    bad = {
        "uint8": good.float(),
        "channels": torch.zeros(2, 4, 16, 16, dtype=torch.uint8),
        "multiples of 8": torch.zeros(2, 3, 20, 16, dtype=torch.uint8),
        r"\(N, 3, H, W\)": torch.zeros(2, 2, 3, 16, 16, dtype=torch.uint8),
    }
    for message, x in bad.items():
        with pytest.raises(ValueError, match=message):
            tok.encode(x)


def test_chunking_layout_and_copies_give_the_same_ids():
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=8, vocab_size=32)
    x = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    ids = DalleTokenizer(enc).encode(x)
    assert torch.equal(DalleTokenizer(enc, chunk_size=2).encode(x), ids)
    tok = DalleTokenizer(enc, compile=True).to(memory_format=torch.channels_last)  # compile: CUDA only
    assert torch.equal(tok.encode(x), ids)
    assert torch.equal(copy.deepcopy(tok).encode(x), ids)


def test_dtypes():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(ValueError):
        parse_dtype("int8")
    tok = DalleTokenizer(DalleEncoder(n_hid=8, vocab_size=16))
    assert tok.autocast_dtype() is torch.float32  # CPU: fp32
    assert DalleTokenizer.default_cuda_dtype is torch.float16  # as DALL-E runs its convs on CUDA


# ------------------------------------------------------------------------------------ frozen interface
def test_tokenizers_are_frozen(trained_vq):
    vq_tok, _ = trained_vq
    for tok in (DalleTokenizer(DalleEncoder(n_hid=8, vocab_size=16)), vq_tok):
        assert isinstance(tok, Tokenizer)
        assert not any(p.requires_grad for p in tok.parameters())
        parent = nn.ModuleDict({"tok": tok, "head": nn.Linear(2, 2)})
        parent.train()
        assert parent["head"].training and not any(m.training for m in tok.modules())
        x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
        assert not tok.encode(x).requires_grad


# ------------------------------------------------------------------------------------ VQ
def test_vq_training_lowers_loss_and_uses_codes(trained_vq):
    tok, history = trained_vq
    assert [h["step"] for h in history] == [10, 20, 30]
    first, last = history[0], history[-1]
    print("VQ history:", [(h["step"], round(h["loss"], 4), round(h["perplexity"], 1), h["usage"]) for h in history])
    assert last["loss"] < 0.9 * first["loss"]  # 0.79 here; 0.71..0.89 over seeds 0..3
    assert last["usage"] > 0.5 and last["perplexity"] > 16  # of 64 codes
    ids = tok.encode(_images(8, 48, seed=1))
    assert ids.shape == (8, 6, 6) and int(ids.max()) < 64
    assert tok.decode(ids).shape == (8, 3, 48, 48)


def test_vq_is_deterministic_by_seed(frames48):
    runs = [train_vq_tokenizer(frames48, vocab_size=32, steps=4, batch_size=8, seed=7, device="cpu",
                               log_every=2, progress=False) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][0].vqvae.codebook, runs[1][0].vqvae.codebook)


def test_vq_accepts_an_iterable_of_batches(frames48):
    batches = list(frames48[:40].split(12))  # uneven: re-chunked into batches of 16
    tok, history = train_vq_tokenizer(batches, vocab_size=16, steps=5, batch_size=16, seed=0, device="cpu",
                                      log_every=5, progress=False)
    assert len(history) == 1 and tok.vocab_size == 16
    with pytest.warns(UserWarning, match="ran out after"):
        train_vq_tokenizer(iter(batches), vocab_size=16, steps=50, batch_size=16, device="cpu", progress=False)


def test_vq_save_load_round_trip(tmp_path, trained_vq):
    tok, _ = trained_vq
    path = tmp_path / "vq.safetensors"
    tok.save(path)
    assert is_vq_tokenizer_file(path)
    x = _images(6, 48, seed=2)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, VQTokenizer) and loaded.config == tok.config
    assert torch.equal(loaded.encode(x), tok.encode(x))

    DalleTokenizer(DalleEncoder(n_hid=8, vocab_size=16)).save(tmp_path / "dalle.safetensors")
    assert not is_vq_tokenizer_file(tmp_path / "dalle.safetensors")
    assert isinstance(load_tokenizer(tmp_path / "dalle.safetensors"), DalleTokenizer)
    with pytest.raises(ValueError, match="not a bevt VQ tokenizer file"):
        VQTokenizer.load(tmp_path / "dalle.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        VQTokenizer.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="cannot tell the tokenizer kind"):
        (tmp_path / "weights.bin").write_bytes(b"")
        load_tokenizer(tmp_path / "weights.bin")


def test_vq_config_validation():
    with pytest.raises(ValueError, match="decay"):
        VQConfig(decay=1.0)
    with pytest.raises(ValueError, match="widths"):
        VQConfig(widths=(8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_input_channels_give_the_same_conv(channels_last):
    """The CUDA path's zero-padded input channels (a faster cuDNN kernel) change no number: checked on CPU."""
    from bevt.tokenizers.dalle import pad_input_channels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 3, 7, 7, generator=g, dtype=torch.float64)
    xp, wp = pad_input_channels(x, w, 4)
    assert xp.shape == (2, 4, 16, 16) and wp.shape == (8, 4, 7, 7)
    assert xp.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(xp[:, :3], x) and not xp[:, 3:].any() and not wp[:, 3:].any()
    torch.testing.assert_close(F.conv2d(xp, wp, padding=3), F.conv2d(x, w, padding=3), rtol=1e-12, atol=1e-12)
    assert pad_input_channels(xp, wp, 4)[0] is xp  # a multiple already: unchanged


# ------------------------------------------------------------------------------------ bevt tokenizer train
def _no_data_work(monkeypatch):
    """Make reading the dataset fail the test: option checks must come before any of it."""
    from bevt.train import pretrain

    def must_not_run(*args, **kwargs):
        raise AssertionError("the dataset was read before the options were checked")

    monkeypatch.setattr(pretrain, "ensure_dataset", must_not_run)
    monkeypatch.setattr(pretrain, "tokenizer_frames", must_not_run)


@pytest.mark.parametrize("option,value", [
    ("--steps", "0"), ("--steps", "-5"), ("--vocab-size", "0"), ("--vocab-size", "1"), ("--frames", "0"),
    ("--frames", "-1"), ("--batch-size", "0"), ("--lr", "0"), ("--device", "foo"), ("--device", "cuda:x"),
])
def test_tokenizer_train_rejects_bad_options_before_any_work(tmp_path, monkeypatch, capsys, option, value):
    from bevt.cli import main

    _no_data_work(monkeypatch)
    out = tmp_path / "tok.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "train", "--out", str(out), option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}: expected" in err and value in err, err
    assert "Traceback" not in err and not out.exists()


def test_tokenizer_train_refuses_a_missing_gpu_before_any_work(tmp_path, monkeypatch, capsys):
    from bevt.cli import main

    _no_data_work(monkeypatch)
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU-only machine)
    assert main(["tokenizer", "train", "--out", str(tmp_path / "tok.safetensors"), "--device", missing]) == 2
    assert f"--device {missing}: no such GPU" in capsys.readouterr().err


def test_tokenizer_train_refuses_an_unwritable_out_before_any_work(tmp_path, monkeypatch, capsys):
    from bevt.cli import main

    _no_data_work(monkeypatch)
    a_file = tmp_path / "models"
    a_file.write_text("keep me")
    assert main(["tokenizer", "train", "--out", str(a_file / "tok.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a folder" in err and "Traceback" not in err, err
    assert a_file.read_text() == "keep me"


def test_tokenizer_train_defaults_only_for_omitted_options(tmp_path, monkeypatch):
    """--steps / --vocab-size given are used as given (the smallest valid ones here); omitted, they come
    from the recipe's tokenizer settings."""
    from bevt import tokenizers
    from bevt.cli import main
    from bevt.tokenizers.vq import VQVAE
    from bevt.train import pretrain

    calls = []

    def fake_train(frames, *, vocab_size, steps, **kwargs):
        calls.append((vocab_size, steps, frames.shape[0]))
        return VQTokenizer(VQVAE(VQConfig(vocab_size=vocab_size))), [{"loss": 1.0, "perplexity": 1.0, "usage": 1.0}]

    monkeypatch.setattr(pretrain, "ensure_dataset", lambda cfg, dist: None)
    monkeypatch.setattr(pretrain, "tokenizer_frames", lambda cfg, max_frames: _images(max_frames, 16))
    monkeypatch.setattr(tokenizers, "train_vq_tokenizer", fake_train)
    base = ["tokenizer", "train", "--set", "tokenizer.vocab_size=24", "--set", "tokenizer.train_steps=7",
            "--frames", "3", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "given.safetensors"), "--steps", "1", "--vocab-size", "2"]) == 0
    assert main(base + ["--out", str(tmp_path / "omitted.safetensors")]) == 0
    assert calls == [(2, 1, 3), (24, 7, 3)]
    assert load_tokenizer(tmp_path / "given.safetensors").vocab_size == 2
