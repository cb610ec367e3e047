"""Synthetic dataset: determinism, decodability, temporal classes, command line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bevt.data import synth
from bevt.data.datasets import read_annotation_list, read_class_names
from bevt.data.video_io import probe, read_frames, read_image


def _decode_all(ds, list_path):
    out = []
    for item in read_annotation_list(list_path):
        out.append(read_frames(item.path, range(probe(item.path).num_frames)))
    return out


def test_fixture_layout(synth_dataset):
    ds = synth_dataset
    train = read_annotation_list(ds.train_list)
    val = read_annotation_list(ds.val_list)
    images = read_annotation_list(ds.images_list)
    assert (len(train), len(val), len(images)) == (16, 8, 16)
    assert read_class_names(ds.classes_file) == list(synth.CLASSES) == list(ds.classes)
    assert read_class_names(ds.image_classes_file) == list(synth.IMAGE_CLASSES)
    # balanced labels, and every file sits in the folder of its class
    assert sorted(s.label for s in train) == sorted(list(range(8)) * 2)
    for s in train + val:
        assert f"/{synth.CLASSES[s.label]}/" in s.path
    info = probe(train[0].path)
    assert (info.num_frames, info.width, info.height, info.codec) == (32, 160, 128, "h264")
    assert info.fps == pytest.approx(25)
    assert read_image(images[0].path).shape == (128, 160, 3)
    assert synth.load(ds.root).settings["num_frames"] == 32


def test_same_seed_same_frames_other_seed_differs(tmp_path):
    kw = dict(num_train=3, num_val=0, num_images=2, num_frames=8, size=(64, 48), workers=1)
    a = synth.generate(tmp_path / "a", seed=5, **kw)
    b = synth.generate(tmp_path / "b", seed=5, **kw)
    c = synth.generate(tmp_path / "c", seed=6, **kw)
    fa, fb, fc = (_decode_all(d, d.train_list) for d in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))
    assert not any(np.array_equal(x, y) for x, y in zip(fa, fc))
    assert a.train_list.read_text() == b.train_list.read_text()
    ia, ib = (read_annotation_list(d.images_list) for d in (a, b))
    assert all(np.array_equal(read_image(x.path), read_image(y.path)) for x, y in zip(ia, ib))


def test_sample_does_not_depend_on_dataset_size_or_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "_POOL_THRESHOLD", 0)  # use the process pool even for 4 files
    small = synth.generate(tmp_path / "small", num_train=2, num_val=0, num_images=0, num_frames=8,
                           size=(64, 48), workers=1)
    large = synth.generate(tmp_path / "large", num_train=4, num_val=0, num_images=0, num_frames=8,
                           size=(64, 48), workers=2)
    fs, fl = _decode_all(small, small.train_list), _decode_all(large, large.train_list)
    assert all(np.array_equal(x, y) for x, y in zip(fs, fl[:2]))


@pytest.mark.parametrize("forward,backward", synth.PAIRS)
def test_pairs_have_identical_frames_in_reverse_order(forward, backward):
    """The twin of each class is the same frames reversed: a single frame (or shuffled frames) carries
    no information about which of the two it is."""
    params = synth.sample_clip_params(np.random.default_rng(3), (96, 64))
    f_T = synth.render_clip(forward, params, 20)
    b_T = synth.render_clip(backward, params, 20)
    assert f_T.shape == (20, 64, 96, 3) and f_T.dtype == np.uint8
    assert np.array_equal(b_T, f_T[::-1])
    assert not np.array_equal(b_T, f_T)  # ... but the order differs: the label is temporal


def _foreground_track(frames_THWC):
    """Per frame: (row centroid, area) of the pixels that differ from the clip's temporal median (the
    static background)."""
    bg = np.median(frames_THWC.astype(np.float32), axis=0)
    fg = np.abs(frames_THWC.astype(np.float32) - bg).sum(-1) > 60
    rows = np.arange(frames_THWC.shape[1])[None, :, None]
    area = fg.sum((1, 2))
    return (fg * rows).sum((1, 2)) / np.maximum(area, 1), area


def test_decoded_clips_carry_the_motion(synth_dataset):
    """After encoding and decoding, a trivial temporal statistic separates each motion pair perfectly:
    the label survives the codec, and it is in the motion."""
    slopes = {c: [] for c in ("move_up", "move_down", "grow", "shrink")}
    for item in read_annotation_list(synth_dataset.train_list):
        name = synth_dataset.classes[item.label]
        if name not in slopes:
            continue
        frames = read_frames(item.path, range(32))
        centroid, area = _foreground_track(frames)
        t = np.arange(32)
        series = centroid if name.startswith("move") else area
        slopes[name].append(np.polyfit(t, series, 1)[0])
    assert all(s < 0 for s in slopes["move_up"]) and all(s > 0 for s in slopes["move_down"])
    assert all(s > 0 for s in slopes["grow"]) and all(s < 0 for s in slopes["shrink"])


def test_decoded_frames_are_close_to_rendered(synth_dataset):
    item = read_annotation_list(synth_dataset.train_list)[5]
    rng = np.random.default_rng([0, 0, 5])  # seed 0, split "train", index 5: the generator's key
    rendered = synth.render_clip(synth.CLASSES[5], synth.sample_clip_params(rng, (160, 128)), 32)
    decoded = read_frames(item.path, range(32))
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((decoded.astype(np.float64) - rendered) ** 2))
    assert psnr > 28, psnr


def test_vp9_webm(tmp_path):
    ds = synth.generate(tmp_path / "v", num_train=2, num_val=0, num_images=0, num_frames=10, size=(64, 48),
                        codec="vp9", workers=1)
    item = read_annotation_list(ds.train_list)[0]
    assert item.path.endswith(".webm")
    info = probe(item.path)
    assert (info.num_frames, info.codec) == (10, "vp9")
    assert read_frames(item.path, [9, 0]).shape == (2, 48, 64, 3)


def test_class_subset_and_bad_arguments(tmp_path):
    ds = synth.generate(tmp_path / "s", num_train=4, num_val=0, num_images=0, num_frames=6, size=(32, 32),
                        classes=["grow", "shrink"], workers=1)
    assert ds.classes == ("grow", "shrink")
    assert [s.label for s in read_annotation_list(ds.train_list)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="classes"):
        synth.generate(tmp_path / "x", classes=["move_left"])
    with pytest.raises(ValueError, match="even"):
        synth.generate(tmp_path / "y", size=(63, 48))
    with pytest.raises(ValueError, match="codec"):
        synth.generate(tmp_path / "z", codec="av1")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        synth.generate(tmp_path / "w", seed=-5)
    assert not (tmp_path / "w").exists()  # refused before the folder is made


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--train", "2", "--val", "1", "--images", "2", "--frames", "6", "--size", "48x32"]
    assert synth.main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 train + 1 val clips" in printed and "train.txt" in printed
    # a non-empty output folder is refused without --overwrite, replaced with it
    assert synth.main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert synth.main(args + ["--overwrite", "--seed", "1"]) == 0
    assert synth.load(out).settings["seed"] == 1
    # --overwrite never deletes a folder this generator did not write
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert synth.main(["--out", str(foreign), "--overwrite"]) == 2
    assert "refusing" in capsys.readouterr().err and (foreign / "precious.txt").exists()
    with pytest.raises(SystemExit):
        synth.main(["--size", "160by128"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    # the options' own checks name the option, before any folder is made
    for option, value, why in (("--seed", "-5", ">= 0"), ("--frames", "1", ">= 2")):
        with pytest.raises(SystemExit):
            synth.main(["--out", str(tmp_path / "never"), option, value])
        err = capsys.readouterr().err
        assert f"argument {option}: expected an integer {why}" in err, err
    assert not (tmp_path / "never").exists()


def test_ensure_reuses_matching_dataset(tmp_path):
    kw = dict(num_train=2, num_val=0, num_images=0, num_frames=6, size=(32, 32), workers=1)
    a = synth.ensure(tmp_path / "e", **kw)
    stamp = a.train_list.stat().st_mtime_ns
    assert synth.ensure(tmp_path / "e", **kw).train_list.stat().st_mtime_ns == stamp
    b = synth.ensure(tmp_path / "e", **{**kw, "num_train": 3})
    assert len(read_annotation_list(b.train_list)) == 3


def test_overwrite_removes_only_what_synth_wrote(tmp_path, capsys):
    """--overwrite replaces the dataset's clips, images and lists, and keeps every other file in the folder:
    the tokenizer `bevt pretrain` trained there (its default place), and files the user put beside ours."""
    out = tmp_path / "data"
    old = ["--out", str(out), "--train", "3", "--val", "2", "--images", "3", "--frames", "6", "--size", "32x32"]
    assert synth.main(old) == 0
    tokenizer = out / "vq_tokenizer.safetensors"  # where bevt pretrain stores the default tokenizer
    tokenizer.write_bytes(b"trained weights")
    (out / "train" / "move_up" / "notes.txt").write_text("mine")
    (out / "train" / "move_up" / "my_clip.mp4").write_bytes(b"mine")
    old_files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    # fewer samples, two classes and another codec: every file of the old dataset is gone
    new = ["--out", str(out), "--train", "2", "--val", "0", "--images", "0", "--frames", "6", "--size", "32x32",
           "--classes", "grow,shrink", "--codec", "vp9", "--overwrite"]
    assert synth.main(new) == 0
    printed = capsys.readouterr().out
    assert tokenizer.read_bytes() == b"trained weights"
    assert (out / "train" / "move_up" / "notes.txt").read_text() == "mine"
    assert (out / "train" / "move_up" / "my_clip.mp4").read_bytes() == b"mine"
    assert "kept 3 file(s)" in printed
    ds = synth.load(out)
    new_files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    written = {p.relative_to(out) for p in (ds.train_list, ds.val_list, ds.images_list, ds.classes_file,
                                             ds.image_classes_file, out / "synth.json")}
    written |= {p.relative_to(out) for p in map(Path, (s.path for s in read_annotation_list(ds.train_list)))}
    kept = {Path(p) for p in ("vq_tokenizer.safetensors", "train/move_up/notes.txt", "train/move_up/my_clip.mp4")}
    assert new_files == written | kept and all(str(p) in printed for p in kept)
    assert old_files - new_files  # the old clips and images were removed
    assert not (out / "val").exists() and not (out / "images").exists()  # folders left empty go too
