"""Augmentation: sizes and draws as the official pipeline, shared crop/flip, tokenizer copy, jitter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bevt.data import transforms as T


def _clip(t=4, h=60, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_rescaled_size_mmcv_rule():
    # scale = 288 / 256 = 1.125: 256 -> 288, 340 * 1.125 = 382.5 -> int(383.0) = 383
    assert T.rescaled_size(256, 340, 288) == (288, 383)
    assert T.rescaled_size(340, 256, 288) == (383, 288)
    assert T.rescaled_size(128, 160, 112) == (112, 140)


def test_sample_params_ranges():
    """Short side on [lo, hi] inclusive; crop offset randint(0, H' - S) (the last offset never drawn)."""
    rng = np.random.default_rng(0)
    draws = [T.sample_params(rng, 60, 80, scale=(64, 66), crop=56) for _ in range(3000)]
    assert {p.scale_short for p in draws} == {64, 65, 66}
    for p in draws:
        h, w = T.rescaled_size(60, 80, p.scale_short)
        assert 0 <= p.crop_top < h - 56 and 0 <= p.crop_left < w - 56
    assert max(p.crop_top for p in draws if p.scale_short == 66) == 66 - 56 - 1
    assert 0.45 < np.mean([p.flip for p in draws]) < 0.55
    with pytest.raises(ValueError, match="does not fit"):
        T.sample_params(rng, 60, 80, scale=(40, 50), crop=56)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_shared_by_every_frame(flip):
    clip = _clip()
    # scale_short = the short side: no resize, so the output is exactly a slice of each frame
    params = T.ClipAugParams(scale_short=60, crop_top=3, crop_left=11, flip=flip)
    out, tok = T.apply_params(clip, params, crop=48, tok_size=24)
    assert out.shape == (4, 48, 48, 3) and tok.shape == (4, 24, 24, 3)
    expected = clip[:, 3:51, 11:59]
    np.testing.assert_array_equal(out, expected[:, :, ::-1] if flip else expected)


def test_rescale_then_crop_matches_per_frame_processing():
    """Every frame gets the same rescale, crop and flip: the clip result equals frame-by-frame results."""
    clip = _clip(t=3)
    params = T.sample_params(np.random.default_rng(4), 60, 80, scale=(70, 90), crop=64)
    out, tok = T.apply_params(clip, params, crop=64, tok_size=32)
    for t in range(3):
        o1, k1 = T.apply_params(clip[t], params, crop=64, tok_size=32)
        np.testing.assert_array_equal(out[t], o1)
        np.testing.assert_array_equal(tok[t], k1)
    # and the rescale is bicubic to the mmcv size, then a plain slice
    h, w = T.rescaled_size(60, 80, params.scale_short)
    big = np.asarray(Image.fromarray(clip[1]).resize((w, h), Image.BICUBIC))
    crop = big[params.crop_top:params.crop_top + 64, params.crop_left:params.crop_left + 64]
    np.testing.assert_array_equal(out[1], crop[:, ::-1] if params.flip else crop)


def test_tokenizer_copy_is_lanczos_resize_of_the_crop():
    clip = _clip()
    params = T.ClipAugParams(scale_short=72, crop_top=5, crop_left=9, flip=True)
    out, tok = T.apply_params(clip, params, crop=64, tok_size=32)
    for t in range(4):
        ref = np.asarray(Image.fromarray(out[t]).resize((32, 32), Image.LANCZOS))
        np.testing.assert_array_equal(tok[t], ref)
    _, none = T.apply_params(clip, params, crop=64, tok_size=None)
    assert none is None


def test_color_jitter_official_formulas():
    img = np.array([[[100, 50, 200], [10, 250, 30]]], dtype=np.uint8)  # (1, 2, 3)
    f = img.astype(np.float32)
    # brightness only: truncation, not rounding (1.15 * 50 = 57.5 -> 57), clipped at 255
    p = T.ColorJitterParams(1.15, 1.0, 1.0, 0.0, (0, 1, 2, 3))
    np.testing.assert_array_equal(T.color_jitter(img, p), np.clip(f * np.float32(1.15), 0, 255).astype(np.uint8))
    # contrast only: c * img + (1 - c) * mean(gray), gray = .2989 R + .587 G + .114 B
    gray = 0.2989 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    p = T.ColorJitterParams(1.0, 0.7, 1.0, 0.0, (0, 1, 2, 3))
    np.testing.assert_array_equal(T.color_jitter(img, p),
                                  np.clip(0.7 * f + 0.3 * gray.mean(), 0, 255).astype(np.uint8))
    # saturation 0 gives grey pixels
    p = T.ColorJitterParams(1.0, 1.0, 0.0, 0.0, (0, 1, 2, 3))
    out = T.color_jitter(img, p)
    assert np.all(out.max(-1) - out.min(-1) <= 1)
    # (without hue and without clipping between steps the three adjustments are linear and nearly
    # commute, so the official random order hardly matters; it is kept for fidelity)
    with pytest.raises(ValueError, match="permutation"):
        T.ColorJitter(order=(0, 0, 1, 2))
    with pytest.raises(ValueError, match="hue"):
        T.ColorJitter(hue=0.1)


def test_image_params_include_jitter_and_apply_it_before_the_crop():
    img = _clip(t=1)[0]
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.0, order=(2, 0, 1, 3))
    params = T.sample_params(np.random.default_rng(1), 60, 80, scale=(60, 60), crop=48, jitter=jitter)
    assert params.color is not None and 0.6 <= params.color.brightness <= 1.4
    out, tok = T.apply_params(img, params, crop=48, tok_size=24)
    assert out.shape == (48, 48, 3) and tok.shape == (24, 24, 3)
    # contrast uses the mean of the whole rescaled image, so jitter-then-crop is what we must get
    full = T.color_jitter(img, params.color)
    ref = full[params.crop_top:params.crop_top + 48, params.crop_left:params.crop_left + 48]
    np.testing.assert_array_equal(out, ref[:, ::-1] if params.flip else ref)


def test_finetune_and_test_building_blocks():
    clip = _clip(t=2, h=60, w=90)
    assert T.resize_short(clip, 30).shape == (2, 30, 45, 3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, ch, cw = T.random_resized_crop_box(rng, 60, 90)
        assert 0 <= top and top + ch <= 60 and 0 <= left and left + cw <= 90
        assert 0.08 * 5400 * 0.9 <= ch * cw <= 5400
    # impossible constraints: the centred square of the short side
    assert T.random_resized_crop_box(rng, 60, 90, area_range=(1.0, 1.0), aspect_ratio_range=(4.0, 4.0)) == (0, 15, 60, 60)
    p = T.sample_finetune_params(rng, 60, 90)
    assert T.apply_finetune_params(clip, p, size=32).shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(T.center_crop(clip, 40), clip[:, 10:50, 25:65])
    three = T.three_crop(clip, 60)  # (3, T, S, S, 3): left, right, middle with step (90 - 60) // 2 = 15
    assert three.shape == (3, 2, 60, 60, 3)
    for v, left in enumerate([0, 30, 15]):
        np.testing.assert_array_equal(three[v], clip[:, :, left:left + 60])
    with pytest.raises(ValueError, match="short side"):
        T.three_crop(clip, 40)


def test_normalize_any_layout():
    x = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8)
    y = T.normalize(x)
    mean = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(y, (x.float() - mean) / std)
    tok = x.permute(0, 2, 1, 3, 4)  # (B, T, 3, s, s)
    torch.testing.assert_close(T.normalize(tok, channel_dim=2), y.permute(0, 2, 1, 3, 4))
    torch.testing.assert_close(T.normalize(tok, channel_dim=-3), y.permute(0, 2, 1, 3, 4))
    assert T.normalize(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="channels"):
        T.normalize(x, channel_dim=2)
