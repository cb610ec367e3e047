"""`bevt eval`, `bevt analyze temporal`, `bevt reproduce`: multi-view softmax averaging, top-k and confusion
summaries, the single-frame / shuffled-frame transforms, end to end on a tiny fine-tuned checkpoint (JSON,
PNG, table; EMA weights; 2-process DDP), the small reproduction, bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bevt.config import ConfigError
from bevt.data.transforms import normalize
from bevt.eval.analyze import shuffle_frames, single_frame, temporal_transforms
from bevt.eval.evaluate import average_views, class_report, confusion_matrix, predict, topk_accuracy


@pytest.fixture(scope="module")
def finetuned(tiny_finetune, tmp_path_factory):
    """A 2-step fine-tuned nano classifier on the synthetic set, with an EMA of its weights (momentum 0.5)."""
    from bevt.train.finetune import finetune

    run = tmp_path_factory.mktemp("ft") / "run"
    s = finetune(tiny_finetune(run, "ema.enabled=true", "ema.momentum=0.5", "ema.warm_up=0", "eval.val_every=0"))
    assert s["steps"] == 2
    return str(run)


# ---------------------------------------------------------------------------------------------------- metrics
class _PoolLinear(torch.nn.Module):
    """A classifier of clips (B, 3, T, H, W): per-channel mean -> linear."""

    def __init__(self, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3, 4)))


def test_multi_view_scores_are_the_mean_of_per_view_softmaxes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=g) * 3
    expect = torch.stack([torch.stack([logits[b, v].softmax(-1) for v in range(6)]).mean(0) for b in range(4)])
    torch.testing.assert_close(average_views(logits), expect)
    assert not torch.allclose(average_views(logits), logits.mean(1).softmax(-1), atol=1e-3)  # not logit averaging
    # through predict(): batches of (B, V, ...) clips, views split into forward passes of 4 across videos
    torch.manual_seed(0)
    model = _PoolLinear(5)
    batches = [{"video": torch.randint(0, 256, (b, 3, 3, 2, 8, 8), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 5, (b,), generator=g), "index": torch.arange(i, i + b)}
               for i, b in ((0, 2), (2, 3))]
    preds = predict(model, batches, device=torch.device("cpu"), max_views=4)["normal"]
    with torch.no_grad():
        manual = torch.cat([torch.stack([torch.stack([model(normalize(x[b, v:v + 1], channel_dim=1))[0].softmax(-1)
                                                      for v in range(x.shape[1])]).mean(0) for b in range(x.shape[0])])
                            for x in (bt["video"] for bt in batches)])
    torch.testing.assert_close(preds.probs, manual)
    assert preds.index.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(preds.labels, torch.cat([bt["label"] for bt in batches]))
    # one view per video: (B, 3, T, H, W) batches are a single view
    single = [{**bt, "video": bt["video"][:, 0]} for bt in batches]
    one = predict(model, single, device=torch.device("cpu"))["normal"]
    with torch.no_grad():
        torch.testing.assert_close(one.probs, torch.cat([model(normalize(bt["video"], channel_dim=1)).softmax(-1)
                                                         for bt in single]))


def test_topk_confusion_and_class_report():
    probs = torch.tensor([[0.7, 0.2, 0.1],   # true 0, top-1 right
                          [0.5, 0.3, 0.2],   # true 1, predicted 0, 2nd
                          [0.6, 0.1, 0.3],   # true 2, predicted 0, 2nd
                          [0.1, 0.2, 0.7],   # true 2, right
                          [0.2, 0.5, 0.3]])  # true 0, predicted 1, 3rd
    labels = torch.tensor([0, 1, 2, 2, 0])
    acc = topk_accuracy(probs, labels, (1, 2, 5))
    assert acc == {1: 2 / 5, 2: 4 / 5, 5: 1.0}  # k above the class count counts every video
    cm = confusion_matrix(probs.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 1]]  # rows true, columns predicted
    r = class_report(probs, labels, ["a", "b", "c"], top_confusions=2)
    assert r["videos"] == 5 and r["top1"] == 2 / 5
    assert [p["accuracy"] for p in r["per_class"]] == [0.5, 0.0, 0.5]
    assert r["mean_class_accuracy"] == pytest.approx(1 / 3)
    assert r["top_confusions"][0] == {"true": "a", "predicted": "b", "videos": 1, "fraction_of_true": 0.5}
    assert len(r["top_confusions"]) == 2
    r = class_report(probs[:2], labels[:2])  # class 2 has no video: no accuracy, not in the mean
    assert r["per_class"][2]["accuracy"] is None and r["mean_class_accuracy"] == 0.5
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        class_report(probs, labels, ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        topk_accuracy(probs[:0], labels[:0])


# ---------------------------------------------------------------------------------------------------- temporal inputs
def _distinct_frames(B=3, V=2, T=8):
    """uint8 (B, V, 3, T, 4, 4) clips whose frames all differ (frame t of clip (b, v) has a marker pixel)."""
    x = torch.randint(0, 200, (B, V, 3, T, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, :, 0, :, 0, 0] = torch.arange(T, dtype=torch.uint8)
    x[:, :, 1, :, 0, 0] = (torch.arange(B) * V).view(B, 1, 1).add(torch.arange(V).view(1, V, 1)).to(torch.uint8)
    return x


def _frame_source(out_THW, clip_CTHW):
    """For each output frame, the input frames it equals (list of lists)."""
    return [[s for s in range(clip_CTHW.shape[1]) if torch.equal(out_THW[:, t], clip_CTHW[:, s])]
            for t in range(out_THW.shape[1])]


def test_single_frame_repeats_one_input_frame():
    x = _distinct_frames()
    out = single_frame(x, [10, 11, 12], seed=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    picked = set()
    for b in range(3):
        for v in range(2):
            src = _frame_source(out[b, v], x[b, v])
            assert all(len(s) == 1 for s in src) and len({s[0] for s in src}) == 1  # one input frame everywhere
            picked.add(src[0][0])
    assert len(picked) > 1  # drawn per (video, view), not one fixed frame
    assert torch.equal(single_frame(x, [10, 11, 12], seed=0), out)  # deterministic for a seed
    assert torch.equal(single_frame(x[[2, 0]], [12, 10], seed=0), out[[2, 0]])  # keyed by dataset index
    assert not torch.equal(single_frame(x, [10, 11, 12], seed=1), out)
    torch.testing.assert_close(single_frame(x[:, 0], [10, 11, 12]), out[:, 0])  # (B, 3, T, H, W) input


def test_shuffle_is_a_seeded_permutation_of_frames():
    x = _distinct_frames(B=4, V=2, T=8)
    out = shuffle_frames(x, [0, 1, 2, 3], seed=0)
    assert out.shape == x.shape
    identity = 0
    for b in range(4):
        for v in range(2):
            src = _frame_source(out[b, v], x[b, v])
            perm = [s[0] for s in src]
            assert all(len(s) == 1 for s in src) and sorted(perm) == list(range(8))  # a permutation
            identity += perm == list(range(8))
    assert identity == 0
    assert torch.equal(shuffle_frames(x, [0, 1, 2, 3], seed=0), out)
    assert torch.equal(shuffle_frames(x[[3, 1]], [3, 1], seed=0), out[[3, 1]])
    assert not torch.equal(shuffle_frames(x, [0, 1, 2, 3], seed=5), out)
    tf = temporal_transforms(seed=0)
    assert tf["normal"] is None and torch.equal(tf["shuffled"](x, [0, 1, 2, 3]), out)
    with pytest.raises(ValueError, match="2 indices for a batch of 4"):
        shuffle_frames(x, [0, 1])
    with pytest.raises(ValueError, match="expected clips"):
        single_frame(x[0, 0], [0])


# ---------------------------------------------------------------------------------------------------- end to end
def test_eval_end_to_end(finetuned, synth_dataset, tmp_path, capsys):
    from bevt.cli import main
    from bevt.eval.evaluate import build_eval_loader, config_for, load_classifier

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", finetuned, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("top-1", "top-5", "mean class accuracy", "per-class accuracy", "move_up", "3 crop(s)", "ema weights"):
        assert text in printed, text
    with open(out / "results.json") as f:
        res = json.load(f)
    assert res["videos"] == 8 and res["weights"] == "ema" and res["list"].endswith("val.txt")
    r = res["results"]["normal"]
    assert sum(map(sum, r["confusion_matrix"])) == 8 and len(r["per_class"]) == 8
    with open(out / "per_class.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the same numbers from predict() on the loaded EMA weights, views averaged by hand
    cfg = config_for(finetuned)
    model, info = load_classifier(finetuned, cfg)
    trainer = torch.load(os.path.join(info["checkpoint"], "trainer.pt"), weights_only=True)
    torch.testing.assert_close(model.head.weight.detach(), trainer["ema"]["shadow"]["head.weight"])
    loader = build_eval_loader(cfg, str(synth_dataset.val_list), num_workers=0)
    manual, labels = [], []
    with torch.no_grad():
        for batch in loader:
            v = batch["video"]  # B, V, 3, T, S, S
            assert v.shape[1] == 3
            manual += [torch.stack([model(normalize(v[b, k:k + 1], channel_dim=1))[0].softmax(-1)
                                    for k in range(v.shape[1])]).mean(0) for b in range(v.shape[0])]
            labels.append(batch["label"])
    loader.close()
    manual, labels = torch.stack(manual), torch.cat(labels)
    assert r["top1"] == pytest.approx(topk_accuracy(manual, labels, (1,))[1])
    assert r["confusion_matrix"] == confusion_matrix(manual.argmax(1), labels, 8).tolist()
    # live weights and another test-view setting (2 clips of 4x4 frames x 3 crops) through the overrides
    out2 = tmp_path / "eval_live"
    assert main(["eval", "--checkpoint", finetuned, "--out", str(out2), "--weights", "live", "--no-plot",
                 "--set", "data.num_segments=0", "--set", "data.clip_len=4", "--set", "data.frame_interval=4",
                 "--set", "eval.test_clips=2"]) == 0
    assert "2 clip(s) x 3 crop(s)" in capsys.readouterr().out
    with open(out2 / "results.json") as f:
        live = json.load(f)
    assert live["weights"] == "live" and not (out2 / "per_class.png").exists()


def test_analyze_temporal_end_to_end(finetuned, tmp_path, capsys):
    from bevt.cli import main

    assert main(["analyze", "temporal", "--checkpoint", finetuned, "--out", str(tmp_path / "t"), "--views", "val",
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Single-frame" in printed and "Random-shuffling" in printed and "run" in printed
    with open(tmp_path / "t" / "temporal.json") as f:
        t = json.load(f)
    assert t["seed"] == 3 and t["videos"] == 8
    tem = t["temporal"]
    for k in ("single_frame", "shuffled"):
        assert tem[k]["drop"] == pytest.approx(tem["normal"]["top1"] - tem[k]["top1"])
        assert tem[k]["top1"] == t["results"][k]["top1"]
    # "normal" is plain evaluation with the same views and weights
    assert main(["eval", "--checkpoint", finetuned, "--out", str(tmp_path / "e"), "--views", "val", "--no-plot"]) == 0
    with open(tmp_path / "e" / "results.json") as f:
        assert json.load(f)["results"]["normal"]["top1"] == tem["normal"]["top1"]


def test_eval_loader_keeps_the_prefix_of_the_config_lists(finetuned, synth_dataset, tmp_path):
    """data.val_prefix / data.test_prefix (mmaction's data_prefix) follow their lists into evaluation; any other
    list's paths start from its own folder."""
    import dataclasses

    from bevt.eval.evaluate import build_eval_loader, config_for

    official = tmp_path / "val_official.txt"  # "val/<class>/x.mp4 3" -> "<class>/x.mp4 3"
    official.write_text("".join(line.split("/", 1)[1] + "\n" for line in open(synth_dataset.val_list).read().splitlines()))
    cfg = config_for(finetuned)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_list=str(official), test_list="",
                                                            val_prefix=str(synth_dataset.root / "val")))
    loader = build_eval_loader(cfg, str(official), "val", num_workers=0)
    try:
        assert all(os.path.exists(s.path) for s in loader.dataset.items) and len(loader.dataset.items) == 8
    finally:
        loader.close()
    plain = build_eval_loader(cfg, str(synth_dataset.val_list), "val", num_workers=0)
    try:
        assert all(os.path.exists(s.path) for s in plain.dataset.items)
    finally:
        plain.close()


def test_default_out_folders_keep_earlier_results(finetuned, tmp_path, capsys):
    """Each list and view setting of a checkpoint gets its own default folder; an evaluation never replaces an
    earlier one's results unless --overwrite, which also removes that evaluation's plot."""
    from bevt.cli import main

    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    step = sorted(os.listdir(run / "checkpoints"))[-1]
    val = run / "eval" / step / "val_val"
    assert main(["eval", "--checkpoint", str(run), "--views", "val"]) == 0
    assert (val / "results.json").exists() and (val / "per_class.png").exists()
    capsys.readouterr()
    before = (val / "results.json").read_bytes()
    # the same evaluation again: refused before any work, the earlier results untouched
    assert main(["eval", "--checkpoint", str(run), "--views", "val", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "holds the results of an earlier evaluation" in err and "--overwrite" in err, err
    assert (val / "results.json").read_bytes() == before and (val / "per_class.png").exists()
    # --overwrite replaces them; without a plot this time, the earlier plot goes too
    assert main(["eval", "--checkpoint", str(run), "--views", "val", "--no-plot", "--overwrite"]) == 0
    assert (val / "results.json").exists() and not (val / "per_class.png").exists()
    # other views: a folder of their own
    assert main(["eval", "--checkpoint", str(run), "--views", "test", "--no-plot"]) == 0
    assert (run / "eval" / step / "val_test" / "results.json").exists()
    # analyze temporal follows the same rule with its temporal.json
    t = ["analyze", "temporal", "--checkpoint", str(run), "--views", "val"]
    assert main(t) == 0 and (run / "temporal" / step / "val_val" / "temporal.json").exists()
    capsys.readouterr()
    assert main(t) == 2 and "temporal.json" in capsys.readouterr().err
    assert main(t + ["--overwrite"]) == 0


def test_eval_ddp_two_processes_match_one(finetuned, synth_dataset, tmp_path):
    """7 videos over 2 gloo processes: the padded repeat is counted once; the same numbers as one process."""
    from bevt.cli import main

    lines = open(synth_dataset.val_list).read().splitlines()[:7]
    lst = tmp_path / "val7.txt"
    lst.write_text("".join(os.path.join(str(synth_dataset.root), ln) + "\n" for ln in lines))
    common = ["--checkpoint", finetuned, "--list", str(lst), "--views", "val", "--no-plot", "--set", "eval.val_batch_size=2",
              "--set", "run.device=cpu"]  # gloo, also on a GPU machine
    assert main(["eval", *common, "--out", str(tmp_path / "one")]) == 0
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
            "-m", "bevt.cli", "eval", *common, "--out", str(tmp_path / "two")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.load(open(tmp_path / n / "results.json")) for n in ("one", "two"))
    assert one["videos"] == two["videos"] == 7
    a, b = one["results"]["normal"], two["results"]["normal"]
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["top5"] == b["top5"]


# ---------------------------------------------------------------------------------------------------- reproduce
def test_reproduce_minimal(tmp_path, capsys):
    from bevt.eval.reproduce import reproduce, reproduce_settings

    s = reproduce_settings("cpu", num_train=16, num_val=8, num_images=16, num_frames=16, size=(80, 64), crop=64,
                           scale_range=(64, 72), short_side=64, pretrain_clip_len=4, pretrain_interval=4,
                           ft_segments=4, vocab_size=16, tokenizer_steps=2, video_batch=4, image_batch=4,
                           image_steps=2, video_steps=2, ft_batch=4, ft_epochs=0.5, test_crops=1, workers=0)
    out = tmp_path / "rep"
    res = reproduce("cpu", str(out), settings=s, device="cpu")
    assert res["complete"] and set(res["rows"]) == {"scratch", "bevt_i", "bevt_v", "bevt"}
    text = capsys.readouterr()
    assert "Table 1" in text.out and "Table 2" in text.out and "BEVT-V" in text.out
    assert "[13/13] eval_scratch" in text.err  # progress per stage
    md = (out / "results.md").read_text()
    assert md.count("| BEVT") == 6 and "PARTIAL" not in md  # BEVT-I, BEVT-V, BEVT in both tables
    for m in ("scratch", "bevt_i", "bevt_v", "bevt"):
        assert (out / f"eval_{m}" / "temporal.json").is_file() and (out / f"eval_{m}" / "per_class.png").is_file()
        assert 0 <= res["rows"][m]["top1"] <= 1
    init = {m: json.load(open(out / f"finetune_{m}.done.json"))["init_from"] for m in res["rows"]}
    assert init["scratch"] == "" and all(f"pretrain_{m}{os.sep}" in init[m] for m in ("bevt_i", "bevt_v", "bevt"))
    with open(out / "pretrain_bevt.done.json") as f:  # joint BEVT starts from BEVT-I's inflated image backbone
        assert any("tiled" in n for n in json.load(f)["init_notes"])
    # a second run skips every stage; other settings in the same folder are refused
    again = reproduce("cpu", str(out), settings=s, device="cpu")
    assert again["rows"] == json.loads(json.dumps(res["rows"]))
    assert capsys.readouterr().err.count("skipped") == 13
    s2 = reproduce_settings("cpu", **{**s.describe(), "ft_epochs": 1.0})
    with pytest.raises(ValueError, match="other settings.*ft_epochs"):
        reproduce("cpu", str(out), settings=s2, device="cpu")
    # --fresh with one method, then the others with the new settings: the stages the fresh run did not redo
    # were made with the old settings and are redone, not reported as done
    reproduce("cpu", str(out), settings=s2, device="cpu", fresh=True, methods=("scratch",))
    capsys.readouterr()
    mixed = reproduce("cpu", str(out), settings=s2, device="cpu", methods=("scratch", "bevt_i"))
    err = capsys.readouterr().err
    assert err.count("other settings; redone") == 4, err  # tokenizer, pretrain, finetune and eval of BEVT-I
    assert err.count("done in an earlier run") == 3, err  # data and scratch's two, made by the fresh run
    with open(out / "finetune_bevt_i" / "config.json") as f:
        assert json.load(f)["optim"]["epochs"] == 1.0
    assert mixed["complete"]


# ---------------------------------------------------------------------------------------------------- bad input
def _pretraining_checkpoint(folder):
    """A bevt pretraining checkpoint (an untrained nano BEVT model and its config), written as training does."""
    from bevt.config import to_dict
    from bevt.models.bevt import create_bevt
    from bevt.recipes import RECIPES
    from bevt.train.checkpoint import save_checkpoint

    cfg = RECIPES.get("default")
    model = create_bevt(cfg.model.name, mode="bevt", vocab_size=cfg.tokenizer.vocab_size)
    return save_checkpoint(str(folder), 1, model=model, trainer_state={}, config=to_dict(cfg), keep_last=1)


def test_bad_input_errors(finetuned, synth_dataset, tmp_path, capsys):
    from bevt.cli import main
    from bevt.eval.evaluate import config_for, evaluate

    def fails(argv, *messages):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        for m in messages:
            assert m in err, (m, err)

    fails(["eval", "--checkpoint", "/no/such/run"], "bevt eval: checkpoint not found: /no/such/run")
    fails(["analyze", "temporal", "--checkpoint", "/no/such/run"], "bevt analyze temporal: checkpoint not found")
    pre = _pretraining_checkpoint(tmp_path / "pre")
    fails(["eval", "--checkpoint", pre], "is a pretraining checkpoint, not a fine-tuned classifier",
          f"bevt finetune --set model.init_from={pre}")
    fails(["eval", "--checkpoint", pre, "--recipe", "default"], "has no classification head")
    fails(["eval", "--checkpoint", finetuned, "--list", "/no/such/list.txt"], "evaluation list not found: /no/such/list.txt")
    fails(["eval", "--checkpoint", finetuned, "--set", "eval.test_clipz=2"], "has no field 'test_clipz'")
    fails(["eval", "--checkpoint", finetuned, "--set", "eval.test_clips"], "must look like section.field=value")
    fails(["eval", "--checkpoint", finetuned, "--set", "model.num_classes=5"],
          "has a head for 8 classes but model.num_classes=5")
    names = tmp_path / "names9.txt"
    names.write_text("".join(f"c{i}\n" for i in range(9)))
    fails(["eval", "--checkpoint", finetuned, "--set", f"data.class_names={names}"],
          "model.num_classes=8 but the dataset has 9 classes")
    bad = tmp_path / "bad_labels.txt"
    bad.write_text(f"{open(synth_dataset.val_list).read().splitlines()[0].split()[0]} 12\n")
    fails(["eval", "--checkpoint", finetuned, "--list", str(bad), "--set", f"data.root={synth_dataset.root}",
           "--set", "data.class_names="], "has label 12, but the model has 8 classes")
    fails(["eval", "--checkpoint", finetuned, "--set", "model.name=videoswin_tiny_patch244_window877"],
          "does not fit model videoswin_tiny_patch244_window877")
    step = config_for(finetuned).run.out_dir + "/checkpoints/step_00000002"
    os.makedirs(tmp_path / "copy")
    shutil.copy(os.path.join(step, "model.safetensors"), tmp_path / "copy" / "model.safetensors")
    fails(["eval", "--checkpoint", str(tmp_path / "copy" / "model.safetensors")], "has no config.json", "--recipe")
    fails(["eval", "--checkpoint", str(tmp_path / "copy" / "model.safetensors"), "--recipe", "default",
           "--weights", "ema", "--set", f"data.root={synth_dataset.root}"], "holds no EMA weights")
    # an unreadable video is not counted, nor replaced by the next one counted twice under its own label
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(os.urandom(3000))
    rows = open(synth_dataset.val_list).read().splitlines()
    mixed = tmp_path / "val_with_a_bad_video.txt"
    mixed.write_text(f"{bad_video} 5\n" + "".join(f"{synth_dataset.root}/{r}\n" for r in rows))
    assert main(["eval", "--checkpoint", finetuned, "--list", str(mixed), "--out", str(tmp_path / "ev_bad"),
                 "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(rows)} videos" in printed and "not counted: 1 unreadable video(s)" in printed, printed
    with open(tmp_path / "ev_bad" / "results.json") as f:
        res = json.load(f)
    assert res["videos"] == len(rows) and res["skipped_files"] == [str(bad_video)]
    assert sum(p["videos"] for p in res["results"]["normal"]["per_class"]) == len(rows)
    a_file = tmp_path / "results_here"  # --out names a file: refused before the evaluation, not after
    a_file.write_text("keep me")
    fails(["eval", "--checkpoint", finetuned, "--out", str(a_file)], f"--out {a_file}: {a_file} is a file, not a folder")
    fails(["analyze", "temporal", "--checkpoint", finetuned, "--out", str(a_file / "sub")],
          "is a file, so the folder cannot be created")
    assert a_file.read_text() == "keep me"
    fails(["reproduce", "--methods", "bevt,bevt_x"], "methods must be distinct names from")
    fails(["reproduce", "--workers", "-1"], "--workers must be >= 0")
    with pytest.raises(SystemExit):  # argparse: --checkpoint is required
        main(["eval"])
    with pytest.raises(ConfigError, match="is a pretraining checkpoint"):
        evaluate(pre)
